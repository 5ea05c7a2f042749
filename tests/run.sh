#!/usr/bin/env bash
# The whole test suite on a fresh machine: venv, install with test extras, pytest.
# Usage: bash tests/run.sh [PYTEST ARGS...]
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
set -e
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
set +e
export TF_CPP_MIN_LOG_LEVEL=3
.venv/bin/python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
