"""Loads our libllama (llama.cpp + patches/ + native/) and binds the pyasl C API with ctypes.

llama-cpp-python is the binding layer for the stock llama.cpp API; it is pointed at our build
through LLAMA_CPP_LIB_PATH before it is first imported. Nothing here ever starts a build.

Where things come from:
- an installed wheel (`pip install .`): libllama and ggml in pyasl/lib, llama-cpp-python's Python
  layer in pyasl/_llama_cpp (both put there by CMakeLists.txt from the pinned sdist);
- a development clone (scripts/setup.sh): the cached build of scripts/build.py, and the llama_cpp
  package installed into the virtualenv without its library (LLAMA_BUILD=OFF).
"""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

from ._paths import build_dir

BUILD_COMMAND = "python scripts/build.py"
INSTALL_HINT = ("Install pyasl with `pip install .` from its source tree (it builds libllama into the package), "
                f"or in a development clone run `bash scripts/setup.sh` (or `{BUILD_COMMAND}`)")

_PKG = Path(__file__).resolve().parent
PACKAGED_LIB_DIR = _PKG / "lib"  # libllama + ggml of an installed wheel
PACKAGED_PY_LAYER = _PKG / "_llama_cpp"  # llama-cpp-python's llama_cpp package of an installed wheel
LIB_NAME = "libllama.dylib" if sys.platform == "darwin" else "llama.dll" if os.name == "nt" else "libllama.so"


class NativeLibraryError(RuntimeError):
    pass


class PyaslError(RuntimeError):
    """A native pyasl call refused its input (the message comes from the C side)."""


def lib_dir() -> Path:
    """Where libllama is loaded from, first match of:

    1. $PYASL_LIB_DIR;
    2. the cache build $PYASL_HOME/build/$PYASL_BUILD_VARIANT/bin, when PYASL_BUILD_VARIANT is set;
    3. pyasl/lib of an installed wheel, when it holds libllama;
    4. the CPU build of scripts/build.py in the cache ($PYASL_HOME/build/cpu/bin, a development clone).
    """
    env = os.environ.get("PYASL_LIB_DIR")
    if env:
        return Path(env).expanduser()
    variant = os.environ.get("PYASL_BUILD_VARIANT")
    if variant:
        return build_dir(variant) / "bin"
    if (PACKAGED_LIB_DIR / LIB_NAME).exists():
        return PACKAGED_LIB_DIR
    return build_dir("cpu") / "bin"


def _use_packaged_python_layer() -> None:
    """An installed wheel carries llama-cpp-python's Python layer in pyasl/_llama_cpp: put it first on
    sys.path, so that `import llama_cpp` (ours, and llama_cpp.server's) finds it before any stock
    llama-cpp-python of the environment. A development clone has no such folder and uses the installed
    llama_cpp package."""
    if (PACKAGED_PY_LAYER / "llama_cpp" / "__init__.py").exists():
        p = str(PACKAGED_PY_LAYER)
        if p not in sys.path:
            sys.path.insert(0, p)


def _ensure_lib_env() -> Path:
    d = lib_dir()
    if not (d / LIB_NAME).exists():
        why = "PYASL_LIB_DIR" if os.environ.get("PYASL_LIB_DIR") else \
            "PYASL_BUILD_VARIANT" if os.environ.get("PYASL_BUILD_VARIANT") else ""
        raise NativeLibraryError(
            f"pyasl's patched llama.cpp library ({LIB_NAME}) was not found in {d}"
            + (f" (set by {why}).\n" if why else ".\n")
            + INSTALL_HINT + ",\nor point PYASL_LIB_DIR at a folder holding a pyasl build of libllama."
        )
    if "llama_cpp" in sys.modules:
        loaded = getattr(sys.modules["llama_cpp"].llama_cpp, "_lib", None)
        if loaded is not None and not hasattr(loaded, "pyasl_abi_version"):
            raise NativeLibraryError(
                "llama_cpp was imported before pyasl and loaded a stock libllama; "
                "import pyasl first or set LLAMA_CPP_LIB_PATH to " + str(d))
    os.environ["LLAMA_CPP_LIB_PATH"] = str(d)
    return d


class PyaslKvInfo(ctypes.Structure):
    _fields_ = [
        ("n_caches", ctypes.c_int32),
        ("n_stream", ctypes.c_int32),
        ("v_trans", ctypes.c_int32),
        ("size_base", ctypes.c_int32),
        ("size_swa", ctypes.c_int32),
        ("used_base", ctypes.c_int32),
        ("used_swa", ctypes.c_int32),
        ("n_layer_base", ctypes.c_int32),
        ("n_layer_swa", ctypes.c_int32),
        ("cell_bytes_base", ctypes.c_int64),
        ("cell_bytes_swa", ctypes.c_int64),
    ]


ABI_VERSION = 4
_LOADED = None


def load():
    """Import llama_cpp on our library and bind the pyasl functions. Returns (llama_cpp, lib)."""
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    _ensure_lib_env()
    _use_packaged_python_layer()
    try:
        import llama_cpp  # noqa: E402  (after LLAMA_CPP_LIB_PATH is set)
    except ImportError as e:
        raise NativeLibraryError(f"llama-cpp-python's Python layer (llama_cpp) cannot be imported: {e}.\n"
                                 + INSTALL_HINT) from e

    lib = llama_cpp.llama_cpp._lib
    if not hasattr(lib, "pyasl_abi_version"):
        raise NativeLibraryError(f"{lib._name} is not a pyasl build of libllama.\n{INSTALL_HINT}")
    c = ctypes
    vp, i32, i64, f32p, i32p = c.c_void_p, c.c_int32, c.c_int64, c.POINTER(c.c_float), c.POINTER(c.c_int32)
    sigs = {
        "pyasl_abi_version": ([], i32),
        "pyasl_last_error": ([], c.c_char_p),
        "pyasl_set_score_window": ([vp, i32, i32], i32),
        "pyasl_capture_new": ([], vp),
        "pyasl_capture_free": ([vp], None),
        "pyasl_capture_clear": ([vp], None),
        "pyasl_capture_set_enabled": ([vp, c.c_bool], None),
        "pyasl_capture_add_prefix": ([vp, c.c_char_p], i32),
        "pyasl_capture_count": ([vp], i32),
        "pyasl_capture_set_stop_layer": ([vp, i32], None),
        "pyasl_set_allow_pos_gaps": ([vp, c.c_bool], i32),
        "pyasl_set_layer_range": ([vp, i32, i32], i32),
        "pyasl_set_reuse_cells": ([vp, c.c_bool], i32),
        "pyasl_set_hidden_output": ([vp, i32, c.c_bool], i32),
        "pyasl_get_hidden": ([vp, i32], f32p),
        "pyasl_kv_copy_cells": ([vp, vp, i32, i32, i32], i32),
        "pyasl_capture_name": ([vp, i32], c.c_char_p),
        "pyasl_capture_layer": ([vp, i32], i32),
        "pyasl_capture_shape": ([vp, i32, c.POINTER(i64)], i32),
        "pyasl_capture_read": ([vp, i32, f32p, i64], i64),
        "pyasl_kv_get_info": ([vp, c.POINTER(PyaslKvInfo)], i32),
        "pyasl_kv_layer_cell_pos": ([vp, i32, i32, i32p, i32], i32),
        "pyasl_kv_keep": ([vp, i32, i32p, i32], i32),
        "pyasl_kv_keep_per_head": ([vp, i32, i32p, i32, i32, i32], i32),
        "pyasl_kv_keep_per_layer": ([vp, i32, i32p, i32p, i32, i32], i32),
        "pyasl_kv_set_layer_cells": ([vp, i32, i32p, i32, i32p, i32], i32),
        "pyasl_kv_get_layer_cells": ([vp, i32p, i32], i32),
        "pyasl_kv_layer_cell_bytes": ([vp, c.POINTER(i64), i32], i32),
        "pyasl_kv_renumber": ([vp, i32], i32),
        # streamed layer-major prefill
        "pyasl_set_kv_one_layer": ([c.c_bool], None),
        "pyasl_kv_gather_layer": ([vp, vp, i32, i32, i32p, i32, i32], i32),
        "pyasl_kv_set_cell_positions": ([vp, i32, i32p, i32], i32),
        # sliding-window models
        "pyasl_model_swa_layers": ([vp, c.POINTER(c.c_bool), i32], i32),
        "pyasl_model_swa_type": ([vp], i32),
        "pyasl_kv_keep_swa": ([vp, i32, i32p, i32], i32),
        "pyasl_kv_copy_cells_swa": ([vp, vp, i32, i32, i32], i32),
    }
    for name, (args, res) in sigs.items():
        f = getattr(lib, name)
        f.argtypes = args
        f.restype = res
    if lib.pyasl_abi_version() != ABI_VERSION:
        raise NativeLibraryError(f"pyasl native ABI {lib.pyasl_abi_version()} != {ABI_VERSION} ({lib._name} is out of "
                                 f"date).\nRebuild it: {INSTALL_HINT}")
    # the address of the C eval callback, typed for llama_context_params.cb_eval
    eval_cb = llama_cpp.ggml_backend_sched_eval_callback(
        ctypes.cast(lib.pyasl_capture_eval_cb, ctypes.c_void_p).value)
    _LOADED = (llama_cpp, lib, eval_cb)
    return _LOADED


def check(rc: int, what: str) -> int:
    """Raise PyaslError with the native message when rc < 0."""
    if rc < 0:
        _, lib, _ = load()
        msg = (lib.pyasl_last_error() or b"").decode(errors="replace")
        raise PyaslError(f"{what}: {msg or 'error ' + str(rc)}")
    return rc
