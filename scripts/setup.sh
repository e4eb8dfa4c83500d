#!/usr/bin/env bash
# Set up pyasl on a fresh Linux machine (idempotent; fast when everything is cached):
#   - system tools (g++, patch) through apt-get when missing and running as root
#   - a virtualenv in .venv (PYASL_VENV to change) with the Python dependencies
#   - libllama = llama.cpp from the pinned llama-cpp-python sdist + patches/ + native/,
#     built into $PYASL_HOME/build/cpu (default ~/.cache/pyasl), outside the clone
#   - llama-cpp-python's Python layer only (LLAMA_BUILD=OFF): it loads our libllama
#   - pyasl itself, editable, with the server extras and the test tools (pexpect, httpx)
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for t in g++ patch; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
if ((${#missing[@]})); then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ patch >/dev/null
    else
        echo "pyasl setup: please install ${missing[*]} (a C++ compiler and patch)" >&2
        exit 1
    fi
fi

PY=${PYTHON:-python3}
VENV=${PYASL_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q cmake ninja scikit-build-core "numpy>=1.24" "gguf>=0.10" "click>=8.1" pytest \
    diskcache jinja2 typing-extensions matplotlib
# pyasl[server] (llama-cpp-python's server) and the test tools (PTY driver, HTTP client)
python -m pip install -q fastapi uvicorn sse-starlette starlette-context pydantic-settings pexpect httpx

python scripts/build.py

if ! python -c "import importlib.metadata as m, sys; sys.exit(m.version('llama_cpp_python') != '0.3.36')" 2>/dev/null; then
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" python -m pip install -q --no-deps "$(python scripts/build.py --print-sdist)"
fi
python -m pip install -q -e .
python -c "from pyasl import _native; _native.load(); print('pyasl ready:', _native.lib_dir())"
