#!/usr/bin/env bash
# Set up a development clone of pyasl on a fresh Linux machine (idempotent; fast when everything is
# cached). A thin wrapper over the pieces, which can also be run by hand:
#   - system tools (g++, patch) through apt-get when missing and running as root
#   - a virtualenv in .venv (PYASL_VENV to change) with the build tools
#   - libllama (llama.cpp from the pinned llama-cpp-python sdist + patches/ + native/) built by
#     scripts/build.py into $PYASL_HOME/build/cpu (default ~/.cache/pyasl), outside the clone, so that
#     every clone (CI's too) reuses one incremental build
#   - llama-cpp-python's Python layer only (LLAMA_BUILD=OFF): it loads our libllama
#   - pyasl itself, editable (compiles nothing: pyproject.toml), with its dependencies from
#     pyproject.toml and the extras test, server and bench
# A plain `pip install .` needs none of this: it builds libllama into the package (README, Install).
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
python -m pip install -q cmake ninja "scikit-build-core>=0.10"

python scripts/build.py

LCP_VERSION=$(python -c "import sys; sys.path.insert(0, '.'); from pyasl._paths import LLAMA_CPP_PYTHON_VERSION as v; print(v)")
if ! python -c "import importlib.metadata as m, sys; sys.exit(m.version('llama_cpp_python') != '$LCP_VERSION')" 2>/dev/null; then
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" python -m pip install -q --no-deps "$(python scripts/build.py --print-sdist)"
fi
# editable: no CMake runs (pyproject.toml); --no-build-isolation uses this venv's scikit-build-core
python -m pip install -q --no-build-isolation -e ".[test,server,bench]"
python -c "from pyasl import _native; _native.load(); print('pyasl ready:', _native.lib_dir())"
