"""Loads our libllama (llama.cpp + patches/ + native/) and binds the pyasl C API with ctypes.

llama-cpp-python is the binding layer for the stock llama.cpp API; it is pointed at our build
through LLAMA_CPP_LIB_PATH before it is first imported. Nothing here ever starts a build.
"""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

from ._paths import build_dir

BUILD_COMMAND = "python scripts/build.py"


class NativeLibraryError(RuntimeError):
    pass


class PyaslError(RuntimeError):
    """A native pyasl call refused its input (the message comes from the C side)."""


def lib_dir() -> Path:
    """$PYASL_LIB_DIR, else the CPU build in the cache ($PYASL_HOME/build/<variant>/bin)."""
    env = os.environ.get("PYASL_LIB_DIR")
    if env:
        return Path(env).expanduser()
    return build_dir(os.environ.get("PYASL_BUILD_VARIANT", "cpu")) / "bin"


def _ensure_lib_env() -> Path:
    d = lib_dir()
    name = "libllama.dylib" if sys.platform == "darwin" else "llama.dll" if os.name == "nt" else "libllama.so"
    if not (d / name).exists():
        raise NativeLibraryError(
            f"pyasl's patched llama.cpp library was not found in {d}.\n"
            f"Build it first (from the pyasl source tree): {BUILD_COMMAND}\n"
            "or point PYASL_LIB_DIR at a folder holding a pyasl build of libllama."
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


ABI_VERSION = 3
_LOADED = None


def load():
    """Import llama_cpp on our library and bind the pyasl functions. Returns (llama_cpp, lib)."""
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    _ensure_lib_env()
    import llama_cpp  # noqa: E402  (after LLAMA_CPP_LIB_PATH is set)

    lib = llama_cpp.llama_cpp._lib
    if not hasattr(lib, "pyasl_abi_version"):
        raise NativeLibraryError(f"{lib._name} is not a pyasl build; run {BUILD_COMMAND}")
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
        raise NativeLibraryError(f"pyasl native ABI {lib.pyasl_abi_version()} != {ABI_VERSION}; rebuild: {BUILD_COMMAND}")
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
