#!/usr/bin/env bash
# Packaging check: build pyasl's sdist, a wheel from that sdist (scikit-build-core: the pinned llama.cpp
# fetched and patched, libllama + ggml + llama-cpp-python's Python layer inside the wheel), install the
# wheel into a FRESH virtualenv outside the clone, and answer the README's example from /tmp with it.
#
#   bash scripts/check_wheel.sh                 # wheel + fresh venv + `pyasl generate smollm2 ...`
#   PYASL_WHEEL_OUT=dist bash scripts/check_wheel.sh   # also keep the sdist and the wheel in dist/
#
# The wheel's CMake build folder is kept in $PYASL_HOME/build/wheel (default ~/.cache/pyasl): the sdist
# is unpacked into the fixed folder $PYASL_HOME/src/pyasl-wheel (only files whose bytes changed are
# rewritten), so a later run from another clone recompiles only what changed. Cold: one full llama.cpp
# compile (about 10 minutes on 2 cores); warm: about a minute (mostly the fresh venv's installs).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
HOME_DIR=$("$PY" -c "import sys; sys.path.insert(0, '.'); from pyasl._paths import cache_home; print(cache_home())")
STAGE="$HOME_DIR/src/pyasl-wheel"
BUILD_DIR="$HOME_DIR/build/wheel"
TOOLS="$HOME_DIR/venvs/wheel-tools"
WORK=$(mktemp -d /tmp/pyasl-wheelcheck.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
log() { echo "[check_wheel] $*"; }
export PIP_DISABLE_PIP_VERSION_CHECK=1

# the build tools (the ones pip's build isolation would fetch), kept between runs: a stable cmake path
# keeps the cached build folder valid
if [ ! -x "$TOOLS/bin/python" ]; then
    "$PY" -m venv "$TOOLS"
fi
"$TOOLS/bin/python" -m pip install -q "scikit-build-core>=0.10" cmake ninja

log "sdist"
mkdir -p "$WORK/dist"
SDIST=$(cd "$ROOT" && "$TOOLS/bin/python" -c \
    "import sys; from scikit_build_core.build import build_sdist; print(build_sdist(sys.argv[1]))" "$WORK/dist" | tail -1)
mkdir -p "$WORK/sdist"
tar -xzf "$WORK/dist/$SDIST" -C "$WORK/sdist"
"$TOOLS/bin/python" - "$WORK/sdist/${SDIST%.tar.gz}" "$STAGE" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "scripts")
from build import sync_tree  # same file-by-file sync as the development build's source folders
print(f"[check_wheel] {sync_tree(Path(sys.argv[1]), Path(sys.argv[2]))} files changed in {sys.argv[2]}")
EOF

log "wheel (build folder $BUILD_DIR)"
start=$(date +%s)
"$TOOLS/bin/python" -m pip wheel -q --no-deps --no-build-isolation -C build-dir="$BUILD_DIR" -w "$WORK/dist" "$STAGE"
WHEEL=$(ls "$WORK"/dist/pyasl-*.whl)
log "built $(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) KiB) in $(( $(date +%s) - start )) s"
"$TOOLS/bin/python" - "$WHEEL" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["pyasl/lib/libllama.so", "pyasl/lib/libggml.so", "pyasl/lib/libggml-base.so", "pyasl/lib/libggml-cpu.so",
        "pyasl/_llama_cpp/llama_cpp/__init__.py", "pyasl/_llama_cpp/llama_cpp/server/app.py",
        "pyasl/examples/long_prompt.txt", "pyasl/_native.py"]
if sys.platform == "darwin":
    need = [n.replace(".so", ".dylib") for n in need]
missing = [n for n in need if n not in names]
stray = [n for n in names if not n.startswith(("pyasl/", "pyasl-"))]
if missing or stray:
    sys.exit(f"[check_wheel] wheel content: missing {missing}, outside pyasl/: {stray[:10]}")
EOF

log "fresh venv $WORK/venv"
"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q "$WHEEL"
if "$WORK/venv/bin/python" -m pip show llama-cpp-python >/dev/null 2>&1; then
    echo "[check_wheel] llama-cpp-python got installed as a dependency (it builds a stock libllama)" >&2
    exit 1
fi

cd /tmp
unset PYASL_LIB_DIR PYASL_BUILD_VARIANT LLAMA_CPP_LIB_PATH
"$WORK/venv/bin/python" - "$WORK/venv" <<'EOF'
import sys
from pathlib import Path
from pyasl import _native
llama_cpp, lib, _ = _native.load()
venv = Path(sys.argv[1]).resolve()
for what, p in (("libllama", Path(lib._name)), ("llama_cpp", Path(llama_cpp.__file__))):
    if venv not in p.resolve().parents:
        sys.exit(f"[check_wheel] {what} came from {p}, not from the fresh venv")
print(f"[check_wheel] libllama {lib._name}\n[check_wheel] llama_cpp {llama_cpp.__file__}")
EOF
log "pyasl generate smollm2 --prompt-file examples/long_prompt.txt (from /tmp)"
"$WORK/venv/bin/pyasl" generate smollm2 --prompt-file examples/long_prompt.txt --policy asl --budget 512 \
    --max-tokens 24 2>&1 | tail -6

if [ -n "${PYASL_WHEEL_OUT:-}" ]; then
    mkdir -p "$ROOT/$PYASL_WHEEL_OUT"
    cp "$WORK/dist/$SDIST" "$WHEEL" "$ROOT/$PYASL_WHEEL_OUT/"
    log "kept in $PYASL_WHEEL_OUT/"
fi
log "ok"
