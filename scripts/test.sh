#!/usr/bin/env bash
# Run the test suite: sets up (cached after the first run), fetches the SmolLM2 test model, runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${PYASL_VENV:-.venv}
"$VENV/bin/pyasl" models fetch smollm2 >/dev/null
exec "$VENV/bin/python" -m pytest -q "$@"
