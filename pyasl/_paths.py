"""Where pyasl keeps its downloads, patched source, builds and models (outside any clone)."""
from __future__ import annotations

import os
from pathlib import Path

# The pinned llama-cpp-python sdist: its vendor/llama.cpp is what patches/ apply to, and its llama_cpp
# package is the Python layer. CMakeLists.txt (cmake/PyaslLlamaSource.cmake) reads these three lines with a
# regex: keep them plain string literals, one per line.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_PYTHON_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_CPP_PYTHON_SDIST_URL = "https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-0.3.36.tar.gz"


def cache_home() -> Path:
    """$PYASL_HOME, else $XDG_CACHE_HOME/pyasl, else ~/.cache/pyasl."""
    env = os.environ.get("PYASL_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "pyasl"


def build_dir(variant: str = "cpu") -> Path:
    return cache_home() / "build" / variant
