#!/usr/bin/env bash
# Train on a SLURM cluster with srun (one task per GPU, no torchrun):
#
#   tools/slurm_train.sh PARTITION JOB_NAME CONFIG [NUM_GPUS] [key=value ...]
#   GPUS_PER_NODE=8 CPUS_PER_TASK=8 SRUN_ARGS="--time=48:00:00" tools/slurm_train.sh gpu ce_r50 \
#       configs/imagenet/cenet/ce_resnet50.yaml 16
#
# Inside an sbatch allocation (SLURM_JOB_ID set) it runs in that allocation and,
# when training was preempted (exit 75: SIGTERM, or SIGUSR1 which srun's
# --signal sends 120 s before the time limit), requeues the job with
# `scontrol requeue`; the requeued job resumes from the work directory's latest
# checkpoint, mid-epoch, with the same remaining batches. Other codes are not
# requeued: 76 means a task died (srun --kill-on-bad-exit ends the others) or a
# node never joined (dist.rdzv_timeout_s), 2 a refused config. Each task reads its
# rank from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (engine/distributed.py);
# MASTER_ADDR is the first node of the step and MASTER_PORT is derived from the job id.
set -u
if [ $# -lt 3 ]; then
  echo "usage: tools/slurm_train.sh PARTITION JOB_NAME CONFIG [NUM_GPUS] [key=value ...]" >&2; exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PARTITION="$1"; JOB_NAME="$2"; CONFIG="$3"; shift 3
GPUS=8
if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then GPUS="$1"; shift; fi
GPUS_PER_NODE="${GPUS_PER_NODE:-$(( GPUS < 8 ? GPUS : 8 ))}"
CPUS_PER_TASK="${CPUS_PER_TASK:-5}"
SRUN_ARGS="${SRUN_ARGS:-}"
. "$ROOT/tools/find_python.sh"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${MASTER_PORT:-}" ]; then
  export MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))
fi
# shellcheck disable=SC2086
srun -p "$PARTITION" --job-name="$JOB_NAME" \
  --gres=gpu:"$GPUS_PER_NODE" --ntasks="$GPUS" --ntasks-per-node="$GPUS_PER_NODE" \
  --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 --signal=USR1@120 ${SRUN_ARGS} \
  "$PYTHON" -u -m tools.train "$CONFIG" "$@"
RC=$?
if [ "$RC" -eq 75 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "preempted: requeueing job $SLURM_JOB_ID (it resumes from the latest checkpoint)"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$RC"
