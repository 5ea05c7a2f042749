#!/usr/bin/env bash
# Train on one host with one or several GPUs: one `python -m infusing_jax.main` process,
# which uses every visible GPU (data parallel over a 1-D device mesh; no --distributed).
#
# Usage: bash launch/gpu.sh --config=CONFIG --workdir=DIR [options] [-- MAIN_ARGS...]
#   --config=CONFIG         configs/X.py[:ARGS], relative to the repo root (required)
#   --workdir=DIR           checkpoints and logs, relative to the repo root (required)
#   --gpus=0,1              use only these GPUs (CUDA_VISIBLE_DEVICES); default: all
#   --install               first pip install -e . 'jax[cuda12]' with PYTHON (and make .venv
#                           if PYTHON is the default and it is missing)
#   --cuda=13               with --install: 'jax[cuda13]' instead (CUDA 13 driver needed)
#   --mem-fraction=F        XLA_PYTHON_CLIENT_MEM_FRACTION, the share of each GPU's memory
#                           JAX preallocates (default: 0.90, or the value already exported)
#   --matmul-precision=P    JAX_DEFAULT_MATMUL_PRECISION, e.g. highest (true float32 instead
#                           of TF32 passes); not set unless asked
#   --python=PYTHON         the interpreter to install into and run; default: .venv/bin/python
#   --dry-run               print the commands, run nothing
#   -- MAIN_ARGS...         passed to infusing_jax.main, e.g. -- --config.train.num_steps=1000
#
# config.data.batch_size must be divisible by the number of GPUs. tf.data runs on the CPU
# (main.py hides the GPUs from TensorFlow), so JAX has the GPUs to itself.
#
# Example:
#   bash launch/gpu.sh --gpus=0,1 --workdir=runs/sop_full \
#     --config=configs/sop.py:method=full,data=/data,checkpoints=/ckpt -- --config.optim.lr=5e-4
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

CONFIG="" WORKDIR="" GPUS="" MATMUL_PRECISION="" INSTALL=0 CUDA=12
MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
PYTHON=".venv/bin/python"
MAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --gpus=*) GPUS="${1#*=}" ;;
    --install) INSTALL=1 ;;
    --cuda=*) CUDA="${1#*=}" ;;
    --mem-fraction=*) MEM_FRACTION="${1#*=}" ;;
    --matmul-precision=*) MATMUL_PRECISION="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    *) die "unknown argument $(quote "$1") (options take --config=VALUE; see --help)" ;;
  esac
  shift
done
[[ -n $CONFIG ]] || die "--config=CONFIG is required"
[[ -n $WORKDIR ]] || die "--workdir=DIR is required"
[[ $CUDA == 12 || $CUDA == 13 ]] || die "--cuda=$CUDA: use 12 or 13"

run cd "$ROOT"
if [[ $INSTALL == 1 ]]; then
  if [[ $PYTHON == .venv/bin/python && ! -x $ROOT/.venv/bin/python ]]; then
    run python3 -m venv .venv
  fi
  run "$PYTHON" -m pip install -q -U pip
  run "$PYTHON" -m pip install -q -e . "jax[cuda$CUDA]"
fi
if [[ -n $GPUS ]]; then setenv CUDA_VISIBLE_DEVICES "$GPUS"; fi
setenv XLA_PYTHON_CLIENT_MEM_FRACTION "$MEM_FRACTION"
if [[ -n $MATMUL_PRECISION ]]; then setenv JAX_DEFAULT_MATMUL_PRECISION "$MATMUL_PRECISION"; fi
run "$PYTHON" -m infusing_jax.main --config="$CONFIG" --workdir="$WORKDIR" "${MAIN_ARGS[@]}"
