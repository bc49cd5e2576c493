#!/usr/bin/env bash
# Train with torchrun:  ./train.sh [CONFIG] [NUM_PROCS] [key=value ...]
#
#   ./train.sh                                   # configs/default.yaml: CE-ResNet-20 on digits, CPU, minutes
#   ./train.sh configs/imagenet/ce_resnet50.yaml 8 train.amp=bf16
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 ./train.sh CONFIG 8   # on node0, then
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 MASTER_PORT=29500 ./train.sh CONFIG 8   # on node1
#
# NUM_PROCS defaults to the number of visible GPUs (1 on CPU). Starting the same
# command again resumes from the work directory's latest checkpoint.
# SIGTERM or SIGUSR1 to this script: every process saves a checkpoint at the
# current step and the script exits with 75 (run it again to continue).
# Exit codes: 0 done, 1 error, 2 refused config (nothing written), 3 nan/inf loss,
# 74 checkpoint write failed, 75 preempted after saving.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"

CONFIG="configs/default.yaml"
if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then CONFIG="$1"; shift; fi
if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then NUM_PROCS="$1"; shift; fi
if [ ! -f "$CONFIG" ] && [ -f "$ROOT/$CONFIG" ]; then CONFIG="$ROOT/$CONFIG"; fi
if [ -z "${NUM_PROCS:-}" ]; then
  NUM_PROCS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  [ "$NUM_PROCS" -ge 1 ] 2>/dev/null || NUM_PROCS=1
fi
if [ "$NUM_PROCS" -lt 1 ]; then echo "error: NUM_PROCS must be >= 1, got $NUM_PROCS" >&2; exit 2; fi

NNODES="${NNODES:-1}"
if [ "$NNODES" -gt 1 ] || [ -n "${MASTER_ADDR:-}" ]; then
  RDZV=(--nnodes="$NNODES" --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}"
        --master_port="${MASTER_PORT:-29500}")
else
  RDZV=(--standalone --nnodes=1)   # a free port: several single-node runs can share a machine
fi

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# refuse a bad config or override here, in one line, before starting processes (and rendezvous)
"$PYTHON" -m tools.train "$CONFIG" "$@" --check || exit $?
EXIT_FILE="$(mktemp "${TMPDIR:-/tmp}/blocklab_exit.XXXXXX")"
export BLOCKLAB_EXIT_FILE="$EXIT_FILE"
"$PYTHON" -m torch.distributed.run "${RDZV[@]}" --nproc_per_node="$NUM_PROCS" \
  -m tools.train "$CONFIG" "$@" &
PID=$!
# torchrun forwards SIGTERM to the workers; turn SIGUSR1/SIGINT into SIGTERM for it too.
trap 'kill -TERM "$PID" 2>/dev/null' TERM USR1 INT
wait "$PID"; RC=$?
while kill -0 "$PID" 2>/dev/null; do wait "$PID"; RC=$?; done
if [ -s "$EXIT_FILE" ]; then RC="$(cat "$EXIT_FILE")"; fi
rm -f "$EXIT_FILE"
exit "$RC"
