#!/usr/bin/env bash
# Start the workers of a hyperparameter sweep: N processes of `python -m infusing_jax.sweep` on
# this host (each on its own GPUs, if there are any), or, with --slurm-array=N, a SLURM job array
# of N one-worker tasks. Every worker pulls trials from the same study until it has
# config.sweep.num_trials; more workers, or the same command again later, join or continue it.
#
# Usage: bash launch/sweep.sh --config=CONFIG --workdir=DIR [options] [-- SWEEP_ARGS...]
#   --config=CONFIG         a sweep config, e.g. configs/toy_sweep.py:world=toy_world (required)
#   --workdir=DIR           the sweep's folder, relative to the repo root (required)
#   --workers=N             local workers (default: 1)
#   --gpus-per-worker=K     give worker i the GPUs i*K .. i*K+K-1 (CUDA_VISIBLE_DEVICES);
#                           default 0: no GPU assignment (CPU workers, or one worker)
#   --storage=URL           an Optuna storage URL the workers share (postgresql://user@host/db);
#                           default: DIR/study.db (SQLite: the processes of one host)
#   --slurm-array=N         write a job script running N array tasks, one worker each, its
#                           index SLURM_ARRAY_TASK_ID (needs --storage: SQLite on a network
#                           filesystem is not safe to share)
#   --partition=P, --time=T, --gpus=G   the array tasks' resources (SLURM)
#   --script=PATH           where to write the job script (default: ./sweep.sbatch)
#   --submit                sbatch the job script
#   --python=PYTHON         default: .venv/bin/python
#   --dry-run               print the commands, run nothing
#   -- SWEEP_ARGS...        passed to infusing_jax.sweep, e.g. -- --config.sweep.num_trials=50
#
# Local workers write DIR/workers/<i>.log; the script waits for all and exits 1 if one failed.
# On several TPU VMs or hosts, run the same sweep command on each with the same --storage.
#
# Example:
#   bash launch/sweep.sh --workers=4 --gpus-per-worker=2 --workdir=sweeps/sop \
#     --config=configs/sop_sweep.py:data=/data,checkpoints=/ckpt
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

CONFIG="" WORKDIR="" WORKERS=1 GPUS_PER_WORKER=0 STORAGE="" ARRAY=0 SUBMIT=0
PARTITION="" TIME="24:00:00" GPUS=0 SCRIPT="sweep.sbatch"
PYTHON=".venv/bin/python"
SWEEP_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --workers=*) WORKERS="${1#*=}" ;;
    --gpus-per-worker=*) GPUS_PER_WORKER="${1#*=}" ;;
    --storage=*) STORAGE="${1#*=}" ;;
    --slurm-array=*) ARRAY="${1#*=}" ;;
    --partition=*) PARTITION="${1#*=}" ;;
    --time=*) TIME="${1#*=}" ;;
    --gpus=*) GPUS="${1#*=}" ;;
    --script=*) SCRIPT="${1#*=}" ;;
    --submit) SUBMIT=1 ;;
    --python=*) PYTHON="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; SWEEP_ARGS=("$@"); break ;;
    *) die "unknown argument $(quote "$1") (options take --config=VALUE; see --help)" ;;
  esac
  shift
done
[[ -n $CONFIG ]] || die "--config=CONFIG is required"
[[ -n $WORKDIR ]] || die "--workdir=DIR is required"
[[ $WORKERS =~ ^[1-9][0-9]*$ ]] || die "--workers=$WORKERS: give a whole number >= 1"
[[ $GPUS_PER_WORKER =~ ^[0-9]+$ ]] || die "--gpus-per-worker=$GPUS_PER_WORKER: give a whole number >= 0"
[[ $ARRAY =~ ^[0-9]+$ ]] || die "--slurm-array=$ARRAY: give a whole number >= 1"
[[ $GPUS =~ ^[0-9]+$ ]] || die "--gpus=$GPUS: give a whole number >= 0"
COMMAND=("$PYTHON" -m infusing_jax.sweep --config="$CONFIG" --workdir="$WORKDIR")
if [[ -n $STORAGE ]]; then COMMAND+=(--storage="$STORAGE"); fi
COMMAND+=("${SWEEP_ARGS[@]}")

run cd "$ROOT"
if [[ $ARRAY -gt 0 ]]; then
  [[ -n $STORAGE ]] || die "--slurm-array needs --storage=URL (a database every node reaches)"
  BODY="#!/usr/bin/env bash
#SBATCH --job-name=infusing_jax_sweep
#SBATCH --array=0-$((ARRAY - 1))
#SBATCH --ntasks=1
#SBATCH --time=$TIME
#SBATCH --output=$WORKDIR/workers/%a.log"
  if [[ -n $PARTITION ]]; then BODY+=$'\n'"#SBATCH --partition=$PARTITION"; fi
  if [[ $GPUS -gt 0 ]]; then BODY+=$'\n'"#SBATCH --gpus=$GPUS"; fi
  BODY+=$'\n'"set -euo pipefail"$'\n'"cd $(quote "$ROOT")"$'\n'"$(quote_all "${COMMAND[@]}")"
  echo "$BODY"
  if [[ $DRY_RUN != 1 ]]; then
    mkdir -p "$WORKDIR/workers"
    printf '%s\n' "$BODY" > "$SCRIPT"
    echo "wrote $SCRIPT"
    if [[ $SUBMIT == 1 ]]; then run sbatch "$SCRIPT"; else echo "submit it with: sbatch $SCRIPT"; fi
  fi
  exit 0
fi

run mkdir -p "$WORKDIR/workers"
PIDS=()
for ((i = 0; i < WORKERS; i++)); do
  if [[ $GPUS_PER_WORKER -gt 0 ]]; then
    GPU_LIST=$(seq -s, $((i * GPUS_PER_WORKER)) $(((i + 1) * GPUS_PER_WORKER - 1)))
    echo "+ CUDA_VISIBLE_DEVICES=$GPU_LIST $(quote_all "${COMMAND[@]}" --worker="$i") > $WORKDIR/workers/$i.log 2>&1 &"
    if [[ $DRY_RUN != 1 ]]; then
      CUDA_VISIBLE_DEVICES=$GPU_LIST "${COMMAND[@]}" --worker="$i" > "$WORKDIR/workers/$i.log" 2>&1 &
      PIDS+=($!)
    fi
  else
    echo "+ $(quote_all "${COMMAND[@]}" --worker="$i") > $WORKDIR/workers/$i.log 2>&1 &"
    if [[ $DRY_RUN != 1 ]]; then
      "${COMMAND[@]}" --worker="$i" > "$WORKDIR/workers/$i.log" 2>&1 &
      PIDS+=($!)
    fi
  fi
done
FAILED=0
for i in "${!PIDS[@]}"; do
  if ! wait "${PIDS[$i]}"; then
    echo "error: worker $i failed; see $WORKDIR/workers/$i.log" >&2
    FAILED=1
  fi
done
exit $FAILED
