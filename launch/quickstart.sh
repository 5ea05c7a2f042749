#!/usr/bin/env bash
# The embedded default: set up a venv, then run the offline demo.
# Usage: bash launch/quickstart.sh [WORKDIR]   (default: ./quickstart_out)
# Until the toy-world quickstart lands, this runs `python -m infusing_jax.demo`:
# a tiny SigLIP written in big_vision format, embedded, converted to Hugging Face
# and open_clip, and checked to give the same embeddings in every format.
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR="${1:-quickstart_out}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[torch]'
export TF_CPP_MIN_LOG_LEVEL=3
.venv/bin/python -m infusing_jax.demo --workdir="$WORKDIR"
