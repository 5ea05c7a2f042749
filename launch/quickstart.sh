#!/usr/bin/env bash
# The embedded default: the paper's claim on a toy world, end to end on a CPU, nothing
# to download. Usage: bash launch/quickstart.sh [WORKDIR]   (default: ./quickstart_out)
#
#  1. writes the toy world (infusing_jax/toy/world.py) to WORKDIR/world
#  2. pretrains a tiny SigLIP on its captions -> WORKDIR/world/vlm/pretrained.npz
#     (skipped when WORKDIR already has it)
#  3. fine-tunes it on the fine-grained domain naively and with the full method
#     (teacher descriptors extracted first), each run testing itself at the end
#  4. WORKDIR/summary.json, WORKDIR/comparison.md and WORKDIR/tradeoff.png
#  5. WORKDIR/report/index.html: what the pretrained model and the two runs retrieve for
#     sampled test queries, side by side (open it in a browser; infusing_jax/report.py)
# Knobs (environment): PYTHON, the interpreter that makes the venv; WORLD_FLAGS, flags
# for infusing_jax.toy.world (e.g. "--generic_train=8000"); PRETRAIN_STEPS (1000) and
# FINETUNE_STEPS (400); RUN_FLAGS, flags after every run's --config (e.g. "--config.train.progress=false").
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR="${1:-quickstart_out}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
export TF_CPP_MIN_LOG_LEVEL=3
RUN=(.venv/bin/python -m)
QUIET=(--verbosity=-1)  # absl: warnings and errors only
WORLD="$WORKDIR/world"
start=$SECONDS
# shellcheck disable=SC2086  # the *_FLAGS are word lists
"${RUN[@]}" infusing_jax.toy.world --root="$WORLD" ${WORLD_FLAGS:-}
if [ ! -f "$WORLD/vlm/pretrained.npz" ]; then
  # shellcheck disable=SC2086
  "${RUN[@]}" infusing_jax.toy.pretrain "${QUIET[@]}" --workdir="$WORLD/vlm" \
    --config="configs/toy_pretrain.py:world=$WORLD,steps=${PRETRAIN_STEPS:-1000}" ${RUN_FLAGS:-}
fi
for method in naive full; do
  # shellcheck disable=SC2086
  "${RUN[@]}" infusing_jax.main "${QUIET[@]}" --workdir="$WORKDIR/$method" \
    --config="configs/toy.py:method=$method,world=$WORLD,steps=${FINETUNE_STEPS:-400}" \
    ${RUN_FLAGS:-}
done
"${RUN[@]}" infusing_jax.compare "$WORKDIR/naive" "$WORKDIR/full" --output="$WORKDIR"
"${RUN[@]}" infusing_jax.report "${QUIET[@]}" "$WORKDIR/naive" "$WORKDIR/full" \
  --output="$WORKDIR/report"
echo "quickstart: $((SECONDS - start)) s; $WORKDIR/summary.json, comparison.md, tradeoff.png," \
  "report/index.html"
