#!/usr/bin/env bash
# Train on several GPU nodes with SLURM: write a job script (and with --submit, sbatch it) that
# runs one task per node; each task is `python -m infusing_jax.main ... --distributed` on all of
# its node's GPUs.
#
# Usage: bash launch/slurm.sh --config=CONFIG --workdir=DIR [options] [-- MAIN_ARGS...]
#   --config=CONFIG        configs/X.py[:ARGS], relative to the repo root (required)
#   --workdir=DIR          checkpoints and logs, on a filesystem every node sees (required)
#   --nodes=N              default: 2
#   --gpus-per-node=G      default: 8
#   --partition=P          default: the cluster's
#   --account=A            default: the cluster's
#   --time=T               wall-clock limit, default 24:00:00
#   --cpus-per-task=C      CPU cores per task (= per node) for tf.data; default: the cluster's
#   --job-name=NAME        default: infusing_jax
#   --mem-fraction=F       XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.90)
#   --python=PYTHON        default: .venv/bin/python (the repo and its venv on a shared filesystem)
#   --script=PATH          where to write the job script (default: ./NAME.sbatch)
#   --submit               sbatch the script (default: write it and say how to submit it)
#   --dry-run              print the script and the commands; write and run nothing
#   -- MAIN_ARGS...        passed to infusing_jax.main, e.g. -- --config.train.num_steps=1000
#
# How JAX finds the other processes (jax/_src/clusters/slurm_cluster.py, and the docs of
# jax.distributed.initialize: https://docs.jax.dev/en/latest/_autosummary/jax.distributed.initialize.html):
# inside an `srun` step it reads SLURM_JOB_ID (-> the coordinator port), SLURM_STEP_NODELIST
# (its first node is the coordinator), SLURM_NTASKS (number of processes), SLURM_PROCID (this
# process) and SLURM_LOCALID. The SLURM_STEP_* variables exist only in an srun step, so the job
# script must start main through srun, not directly. On GPUs, JAX then also restricts each
# process to the single GPU numbered SLURM_LOCALID ("a single device per process"), which with
# one task per node would leave all but GPU 0 idle. The job script therefore exports
# JAX_LOCAL_DEVICE_IDS=0,...,G-1 (read by jax.distributed.initialize, added in 2024 by
# jax-ml/jax#22373; the one-GPU default is jax-ml/jax#16788), so each process drives all G
# GPUs of its node. One task per node also means one tf.data pipeline per node.
# srun does not inherit --cpus-per-task from sbatch since Slurm 22.05, so it is passed to both.
#
# Example:
#   bash launch/slurm.sh --nodes=4 --gpus-per-node=8 --partition=gpu --time=12:00:00 \
#     --workdir=/shared/runs/sop_full --submit \
#     --config=configs/sop.py:method=full,data=/shared/data,checkpoints=/shared/ckpt
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

CONFIG="" WORKDIR="" PARTITION="" ACCOUNT="" CPUS="" SCRIPT="" SUBMIT=0
NODES=2 GPUS_PER_NODE=8 TIME="24:00:00" JOB_NAME="infusing_jax" MEM_FRACTION="0.90"
PYTHON=".venv/bin/python"
MAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --nodes=*) NODES="${1#*=}" ;;
    --gpus-per-node=*) GPUS_PER_NODE="${1#*=}" ;;
    --partition=*) PARTITION="${1#*=}" ;;
    --account=*) ACCOUNT="${1#*=}" ;;
    --time=*) TIME="${1#*=}" ;;
    --cpus-per-task=*) CPUS="${1#*=}" ;;
    --job-name=*) JOB_NAME="${1#*=}" ;;
    --mem-fraction=*) MEM_FRACTION="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --script=*) SCRIPT="${1#*=}" ;;
    --submit) SUBMIT=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    *) die "unknown argument $(quote "$1") (options take --nodes=VALUE; see --help)" ;;
  esac
  shift
done
[[ -n $CONFIG ]] || die "--config=CONFIG is required"
[[ -n $WORKDIR ]] || die "--workdir=DIR is required"
for n in "$NODES" "$GPUS_PER_NODE" "${CPUS:-1}"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || die "--nodes, --gpus-per-node and --cpus-per-task take a positive integer, not $(quote "$n")"
done
for v in "$PARTITION" "$ACCOUNT" "$TIME" "$JOB_NAME"; do
  [[ $v =~ ^[A-Za-z0-9_.:,+-]*$ ]] || die "$(quote "$v"): #SBATCH values cannot hold spaces or quotes"
done
SCRIPT="${SCRIPT:-$JOB_NAME.sbatch}"

job_script() {
  echo "#!/bin/bash"
  echo "#SBATCH --job-name=$JOB_NAME"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=1"
  echo "#SBATCH --gres=gpu:$GPUS_PER_NODE"
  if [[ -n $CPUS ]]; then echo "#SBATCH --cpus-per-task=$CPUS"; fi
  if [[ -n $PARTITION ]]; then echo "#SBATCH --partition=$PARTITION"; fi
  if [[ -n $ACCOUNT ]]; then echo "#SBATCH --account=$ACCOUNT"; fi
  echo "#SBATCH --time=$TIME"
  echo "# Written by launch/slurm.sh. One task per node, each on all $GPUS_PER_NODE GPUs of its node;"
  echo "# jax.distributed finds the processes from srun's SLURM_* variables."
  echo "set -euo pipefail"
  echo "cd $(quote "$ROOT")"
  echo "export XLA_PYTHON_CLIENT_MEM_FRACTION=$(quote "$MEM_FRACTION")"
  echo "# Without this, JAX gives each task only GPU \$SLURM_LOCALID (= 0 with one task per node)."
  echo "export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((GPUS_PER_NODE - 1)))"
  local srun=(srun --nodes="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1)
  if [[ -n $CPUS ]]; then srun+=(--cpus-per-task="$CPUS"); fi
  echo "$(quote_all "${srun[@]}") \\"
  echo "  $(quote_all "$PYTHON" -m infusing_jax.main --config="$CONFIG" --workdir="$WORKDIR") \\"
  echo "  $(quote_all --distributed "${MAIN_ARGS[@]}")"
}

JOB="$(job_script)"
echo "+ cat > $(quote "$SCRIPT") <<'EOF'"
echo "$JOB"
echo "EOF"
if [[ $DRY_RUN != 1 ]]; then
  echo "$JOB" > "$SCRIPT"
fi
if [[ $SUBMIT == 1 ]]; then
  run sbatch "$SCRIPT"
else
  echo "submit it with: sbatch $(quote "$SCRIPT")"
fi
