#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: create it, install this repo on every worker,
# then run the same `python -m infusing_jax.main ... --distributed` on all workers at once
# (jax.distributed.initialize finds the coordinator and process ids by itself on TPU VMs).
#
# Usage: bash launch/tpu_vm.sh --name=NAME --config=CONFIG --workdir=DIR [options] [-- MAIN_ARGS...]
#   --name=NAME          the TPU VM (required)
#   --config=CONFIG      configs/X.py[:ARGS], relative to the repo root (required)
#   --workdir=DIR        checkpoints and logs; a path every worker sees (required; see Storage)
#   --zone=ZONE          default: us-central2-b
#   --accelerator=TYPE   v4-8 (one host, the default), v4-32, v5litepod-16, v6e-16 ...
#   --version=RUNTIME    TPU VM image: tpu-ubuntu2204-base (v4, the default),
#                        v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv6e (v6e)
#   --project=PROJECT    default: gcloud's configured project
#   --create             create the TPU VM first (the default)
#   --no-create          use an existing one
#   --no-install         skip copying and installing the repo (done by an earlier call)
#   --repo=URL           git clone URL on the workers instead of copying the local HEAD
#   --ref=REF            with --repo: git checkout REF
#   --python=PYTHON      the workers' python for the venv (default: python3)
#   --delete-after       delete the TPU VM at the end (also when the run fails)
#   --dry-run            print the commands, run nothing
#   -- MAIN_ARGS...      passed to infusing_jax.main, e.g. -- --config.train.num_steps=1000
#
# Install: the local HEAD commit (git archive, so uncommitted changes are not shipped) is
# copied to ~/infusing_jax on every worker, then `pip install -e . 'jax[tpu]'` into
# ~/infusing_jax/.venv. The current jax needs Python >= 3.11; the TPU VM images ship 3.10,
# where pip falls back to an older jax: pass --python=python3.11 if the image has it.
#
# Storage: on a pod slice (more than one host) every worker writes its shards of the same
# Orbax checkpoint, so --workdir must be one directory that all workers see: a gs:// URL
# (Orbax writes it; logs, JSON, input-pipeline state and teacher descriptors go through
# tf.io.gfile; not exercised offline, where there is no Cloud Storage), a Cloud Storage
# bucket mounted with gcsfuse at the same path on every worker (Orbax renames its temporary
# checkpoint directories: mount with --rename-dir-limit, or use a hierarchical-namespace
# bucket), or a Filestore / NFS mount. The model checkpoint and UnED data (data=,
# checkpoints= of configs/*.py) must be readable on every worker as local or mounted
# paths; TFDS data (data.data_dir) may be gs://.
#
# Example:
#   bash launch/tpu_vm.sh --name=sop --accelerator=v4-32 --workdir=/mnt/gcs/runs/sop_full \
#     --config=configs/sop.py:method=full,data=/mnt/gcs/data,checkpoints=/mnt/gcs/ckpt \
#     --delete-after -- --config.train.num_steps=2000
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

NAME="" CONFIG="" WORKDIR="" PROJECT="" REPO="" REF=""
ZONE="us-central2-b" ACCELERATOR="v4-8" VERSION="tpu-ubuntu2204-base" PYTHON="python3"
CREATE=1 INSTALL=1 DELETE_AFTER=0
MAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --accelerator=*) ACCELERATOR="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --repo=*) REPO="${1#*=}" ;;
    --ref=*) REF="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --create) CREATE=1 ;;
    --no-create) CREATE=0 ;;
    --no-install) INSTALL=0 ;;
    --delete-after) DELETE_AFTER=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    *) die "unknown argument $(quote "$1") (options take --name=VALUE; see --help)" ;;
  esac
  shift
done
[[ -n $NAME ]] || die "--name=NAME is required"
[[ -n $CONFIG ]] || die "--config=CONFIG is required"
[[ -n $WORKDIR ]] || die "--workdir=DIR is required"

# Flags for every gcloud call on this TPU.
TPU=(--zone="$ZONE")
if [[ -n $PROJECT ]]; then TPU+=(--project="$PROJECT"); fi

delete_tpu() {
  run gcloud compute tpus tpu-vm delete "$NAME" "${TPU[@]}" --quiet
}

if [[ $CREATE == 1 ]]; then
  run gcloud compute tpus tpu-vm create "$NAME" "${TPU[@]}" \
    --accelerator-type="$ACCELERATOR" --version="$VERSION"
fi
if [[ $DELETE_AFTER == 1 ]]; then
  trap delete_tpu EXIT
fi

if [[ $INSTALL == 1 ]]; then
  if [[ -n $REPO ]]; then
    fetch="rm -rf ~/infusing_jax && git clone $(quote "$REPO") ~/infusing_jax"
    if [[ -n $REF ]]; then fetch+=" && git -C ~/infusing_jax checkout $(quote "$REF")"; fi
  else
    tarball="${TMPDIR:-/tmp}/infusing_jax-$NAME.tar.gz"
    run git -C "$ROOT" archive --format=tar.gz --prefix=infusing_jax/ -o "$tarball" HEAD
    run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:infusing_jax.tar.gz" "${TPU[@]}" --worker=all
    fetch="tar -xzf ~/infusing_jax.tar.gz -C ~"
  fi
  venv="$(quote "$PYTHON") -m venv .venv"
  install="$fetch && cd ~/infusing_jax"
  install+=" && ($venv || (sudo apt-get -qq update && sudo apt-get -qq install -y python3-venv && $venv))"
  install+=" && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e . \"jax[tpu]\""
  run gcloud compute tpus tpu-vm ssh "$NAME" "${TPU[@]}" --worker=all --command="$install"
fi

train="cd ~/infusing_jax && .venv/bin/python -m infusing_jax.main"
train+=" $(quote_all --config="$CONFIG" --workdir="$WORKDIR" --distributed "${MAIN_ARGS[@]}")"
run gcloud compute tpus tpu-vm ssh "$NAME" "${TPU[@]}" --worker=all --command="$train"
