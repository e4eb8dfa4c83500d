#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run: builds libllama (llama.cpp + patches/ + native/,
# RelWithDebInfo, -fsanitize=address,undefined, AMX compiled out) into $PYASL_HOME/build/cpu-asan
# (cached, incremental like the normal build) and runs the tests that drive the native code on tiny
# models against it. Any ASan or UBSan report fails the run (halt_on_error).
#   bash scripts/test_asan.sh                                   # the default selection
#   bash scripts/test_asan.sh -k keep                           # extra pytest arguments
#   PYASL_ASAN_TESTS=tests/test_fuzz.py bash scripts/test_asan.sh  # other test files
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PYASL_VENV:-.venv}
[ -x "$VENV/bin/python" ] || bash scripts/setup.sh
PY="$VENV/bin/python"

"$PY" scripts/build.py --sanitize
LIB=$("$PY" scripts/build.py --sanitize --print-lib-dir)

# the ASan runtime must come first in the process: preload the one of the compiler that built the library
CXX_USED=$(sed -n 's/^CMAKE_CXX_COMPILER:[A-Z]*=//p' "$LIB/../CMakeCache.txt")
ASAN_RT=$("${CXX_USED:-g++}" -print-file-name=libasan.so)
# python does not link libstdc++: without it preloaded too, ASan's __cxa_throw interceptor finds no real
# __cxa_throw and the first C++ exception inside llama.cpp aborts ("CHECK failed ... real___cxa_throw")
STDCXX_RT=$("${CXX_USED:-g++}" -print-file-name=libstdc++.so)
for f in "$ASAN_RT" "$STDCXX_RT"; do
    if [ ! -e "$f" ]; then
        echo "test_asan: $f not found for ${CXX_USED:-g++}" >&2
        exit 1
    fi
done

export PYASL_LIB_DIR="$LIB"
export LD_PRELOAD="$ASAN_RT:$STDCXX_RT${LD_PRELOAD:+:$LD_PRELOAD}"
# Python itself is not instrumented and keeps memory until exit by design: no leak check
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_stack_use_after_return=0:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
export GGML_NO_BACKTRACE=1  # ggml's gdb backtrace on abort would hang under ptrace limits

# the tests that drive the native code on tiny models (override with PYASL_ASAN_TESTS); arguments are
# passed on to pytest
read -r -a TESTS <<< "${PYASL_ASAN_TESTS:-tests/test_native.py tests/test_reliability.py tests/test_fuzz.py tests/test_layer_major.py tests/test_two_pass.py tests/test_arch_limits.py}"
set -- "${TESTS[@]}" -m "not real" "$@"
"$PY" -c "import pyasl._native as n; n.load(); print('pyasl ASan+UBSan library:', n.lib_dir())"
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
