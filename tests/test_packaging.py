"""Packaging without compiling anything: where pyasl loads libllama and llama_cpp from, the package
metadata (scikit-build-core, no dependency on llama-cpp-python, which would build a second, stock
libllama), the one place the pinned sdist is written (pyasl/_paths.py, read by CMake with a regex),
the example prompt fallback and scripts/build.py's quiet output. scripts/check_wheel.sh does the real
build: sdist, wheel, fresh venv, `pyasl generate` from /tmp."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pyasl import _native, _paths

ROOT = Path(__file__).resolve().parent.parent

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for v in ("PYASL_LIB_DIR", "PYASL_BUILD_VARIANT", "XDG_CACHE_HOME"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("PYASL_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(_native, "PACKAGED_LIB_DIR", tmp_path / "pkg" / "lib")
    return tmp_path


def test_lib_dir_order(clean_env, monkeypatch):
    tmp = clean_env
    # nothing packaged: the development build in the cache
    assert _native.lib_dir() == tmp / "home" / "build" / "cpu" / "bin"
    # an installed wheel's pyasl/lib wins over the cache once it holds libllama
    pkg = tmp / "pkg" / "lib"
    pkg.mkdir(parents=True)
    assert _native.lib_dir() == tmp / "home" / "build" / "cpu" / "bin"
    (pkg / _native.LIB_NAME).write_bytes(b"")
    assert _native.lib_dir() == pkg
    # an explicit cache variant, then an explicit folder, win over the package
    monkeypatch.setenv("PYASL_BUILD_VARIANT", "cpu-asan")
    assert _native.lib_dir() == tmp / "home" / "build" / "cpu-asan" / "bin"
    monkeypatch.setenv("PYASL_LIB_DIR", str(tmp / "mine"))
    assert _native.lib_dir() == tmp / "mine"


def test_missing_library_says_how_to_fix(clean_env, monkeypatch):
    with pytest.raises(_native.NativeLibraryError, match=r"pip install \.(.|\n)*scripts/setup.sh(.|\n)*PYASL_LIB_DIR"):
        _native._ensure_lib_env()
    monkeypatch.setenv("PYASL_LIB_DIR", str(clean_env / "nowhere"))
    with pytest.raises(_native.NativeLibraryError, match="set by PYASL_LIB_DIR"):
        _native._ensure_lib_env()


def test_packaged_python_layer_goes_first(tmp_path, monkeypatch):
    layer = tmp_path / "_llama_cpp"
    monkeypatch.setattr(_native, "PACKAGED_PY_LAYER", layer)
    monkeypatch.setattr(sys, "path", list(sys.path))
    _native._use_packaged_python_layer()
    assert str(layer) not in sys.path  # a development clone: no packaged layer, the installed llama_cpp
    (layer / "llama_cpp").mkdir(parents=True)
    (layer / "llama_cpp" / "__init__.py").write_text("")
    _native._use_packaged_python_layer()
    _native._use_packaged_python_layer()
    assert sys.path[0] == str(layer) and sys.path.count(str(layer)) == 1


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_metadata_builds_with_scikit_build_core_and_no_stock_llama_cpp():
    meta = _pyproject()
    assert meta["build-system"]["build-backend"] == "scikit_build_core.build"
    assert not any(r.lower().startswith("llama") for r in meta["build-system"]["requires"])
    deps = meta["project"]["dependencies"]
    names = {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}
    assert "llama-cpp-python" not in names
    for extra in meta["project"]["optional-dependencies"].values():
        assert not any(d.lower().replace("_", "-").startswith("llama-cpp-python") for d in extra)
    # llama-cpp-python's own runtime dependencies come with its Python layer
    assert {"numpy", "typing-extensions", "diskcache", "jinja2"} <= names
    assert set(meta["project"]["optional-dependencies"]) >= {"test", "server", "bench"}
    assert meta["project"]["scripts"]["pyasl"] == "pyasl.apps.cli:main"
    sk = meta["tool"]["scikit-build"]
    assert sk["wheel"]["packages"] == ["pyasl"]
    assert sk["install"]["components"] == ["pyasl"]
    # an editable install (scripts/setup.sh) compiles nothing: it uses scripts/build.py's cached build
    editable = [o for o in sk.get("overrides", []) if o.get("if", {}).get("state") == "editable"]
    assert editable and editable[0]["wheel"]["cmake"] is False


def test_pinned_sdist_written_once_and_readable_by_cmake():
    text = (ROOT / "pyasl" / "_paths.py").read_text()
    for key in ("LLAMA_CPP_PYTHON_VERSION", "LLAMA_CPP_PYTHON_SDIST_SHA256", "LLAMA_CPP_PYTHON_SDIST_URL"):
        # the line cmake/PyaslLlamaSource.cmake's regex expects: KEY = "value", once
        assert len(re.findall(rf'^{key} = "[^"]+"$', text, flags=re.M)) == 1, key
    assert _paths.LLAMA_CPP_PYTHON_SDIST_URL.endswith(f"/llama_cpp_python-{_paths.LLAMA_CPP_PYTHON_VERSION}.tar.gz")
    assert re.fullmatch(r"[0-9a-f]{64}", _paths.LLAMA_CPP_PYTHON_SDIST_SHA256)
    # nobody else writes the pin down
    for p in [ROOT / "CMakeLists.txt", *(ROOT / "cmake").glob("*.cmake"), *(ROOT / "scripts").glob("*.*")]:
        assert _paths.LLAMA_CPP_PYTHON_SDIST_SHA256 not in p.read_text(errors="replace"), p


@pytest.mark.skipif(shutil.which("cmake") is None, reason="no cmake")
def test_cmake_reads_the_pin(tmp_path):
    script = tmp_path / "pin.cmake"
    script.write_text(
        f'include("{ROOT.as_posix()}/cmake/PyaslLlamaSource.cmake")\n'
        f'foreach (k LLAMA_CPP_PYTHON_VERSION LLAMA_CPP_PYTHON_SDIST_SHA256 LLAMA_CPP_PYTHON_SDIST_URL)\n'
        f'  _pyasl_read_pin(v ${{k}} "{ROOT.as_posix()}/pyasl/_paths.py")\n'
        f'  message(STATUS "${{k}}=${{v}}")\n'
        f'endforeach()\n')
    out = subprocess.run(["cmake", "-P", str(script)], capture_output=True, text=True, check=True)
    got = dict(re.findall(r"-- (\w+)=(\S+)", out.stdout + out.stderr))
    assert got == {"LLAMA_CPP_PYTHON_VERSION": _paths.LLAMA_CPP_PYTHON_VERSION,
                   "LLAMA_CPP_PYTHON_SDIST_SHA256": _paths.LLAMA_CPP_PYTHON_SDIST_SHA256,
                   "LLAMA_CPP_PYTHON_SDIST_URL": _paths.LLAMA_CPP_PYTHON_SDIST_URL}


def test_example_prompt_from_any_directory(tmp_path, monkeypatch):
    from pyasl.apps.cli.common import example_file, read_prompt

    monkeypatch.chdir(tmp_path)
    shipped = example_file("examples/long_prompt.txt")
    assert shipped is not None and shipped.is_file()
    assert read_prompt(None, "examples/long_prompt.txt") == shipped.read_text(encoding="utf-8")
    assert example_file("examples/no_such_prompt.txt") is None
    assert example_file("long_prompt.txt") is None
    # a file of that name in the current directory is the one read
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "long_prompt.txt").write_text("mine")
    assert example_file("examples/long_prompt.txt") is None
    assert read_prompt(None, "examples/long_prompt.txt") == "mine"


def test_build_output_is_quiet_until_it_fails(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("pyasl_build_script", ROOT / "scripts" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    ok = "for i in range(1, 41): print(f'[{i}/40] c++ f{i}.cpp'); print('warning: unused variable')"
    build.run_quiet([sys.executable, "-c", ok], tmp_path / "ok.log", "compiling")
    out = capsys.readouterr().out
    assert "compiling 100%" in out and "warning" not in out
    assert "warning: unused variable" in (tmp_path / "ok.log").read_text()
    bad = "print('[1/2] c++ a.cpp'); print('warning: w'); print('error: boom'); raise SystemExit(2)"
    with pytest.raises(SystemExit, match="compiling failed"):
        build.run_quiet([sys.executable, "-c", bad], tmp_path / "bad.log", "compiling")
    assert "error: boom" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("git") is None, reason="no cmake or git")
@pytest.mark.parametrize("tool", ["patch", "git"])
def test_cmake_applies_patches_or_fails_clearly(tmp_path, tool):
    if tool == "patch" and shutil.which("patch") is None:
        pytest.skip("no patch")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.txt").write_text("one\ntwo\nthree\n")
    good = tmp_path / "0001-good.patch"
    good.write_text("--- a/a.txt\n+++ b/a.txt\n@@ -1,3 +1,3 @@\n one\n-two\n+TWO\n three\n")
    bad = tmp_path / "0002-bad.patch"
    bad.write_text("--- a/a.txt\n+++ b/a.txt\n@@ -1,3 +1,3 @@\n one\n-zwei\n+ZWEI\n three\n")
    bin_dir = tmp_path / "bin"  # only the chosen tool on PATH
    bin_dir.mkdir()
    (bin_dir / tool).symlink_to(shutil.which(tool))

    def run(patches):
        script = tmp_path / "apply.cmake"
        script.write_text(f'include("{ROOT.as_posix()}/cmake/PyaslLlamaSource.cmake")\n'
                          f'set(ENV{{PATH}} "{bin_dir.as_posix()}")\n'
                          f'_pyasl_apply_patches("{tree.as_posix()}" "{";".join(p.as_posix() for p in patches)}")\n')
        return subprocess.run([shutil.which("cmake"), "-P", str(script)], capture_output=True, text=True)

    r = run([good])
    assert r.returncode == 0, r.stderr
    assert (tree / "a.txt").read_text() == "one\nTWO\nthree\n"
    r = run([bad])
    assert r.returncode != 0 and "0002-bad.patch does not apply cleanly" in r.stderr
