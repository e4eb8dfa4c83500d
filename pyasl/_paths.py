"""Where pyasl keeps its downloads, patched source, builds and models (outside any clone)."""
from __future__ import annotations

import os
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_PYTHON_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"


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
