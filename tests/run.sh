#!/usr/bin/env bash
# The whole test suite on a fresh machine: Debian's PostgreSQL server (the sweep's shared
# storage is tested on a real one) and Chromium with its driver (the retrieval report's
# page is loaded in a real headless browser), a venv, the package with its test extras,
# pytest on two workers (one test file per worker at a time).
# Usage: bash tests/run.sh [PYTEST ARGS...]
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
set -e
MISSING=()
compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null || MISSING+=(postgresql)
command -v chromium > /dev/null || MISSING+=(chromium)
[ -x /usr/bin/chromedriver ] || MISSING+=(chromium-driver)
if [ "${#MISSING[@]}" -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${MISSING[@]}" > /dev/null
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
set +e
export TF_CPP_MIN_LOG_LEVEL=3
.venv/bin/python -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder --durations=15 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
