#!/usr/bin/env bash
# Evaluate a checkpoint:  ./test.sh CONFIG CHECKPOINT [NUM_PROCS] [key=value ...] [--ema]
#
#   ./test.sh configs/default.yaml work_dirs/default/checkpoints/best.pth
#   ./test.sh configs/imagenet/ce_resnet50.yaml ce_resnet50 8      # a model-zoo name (downloaded, verified)
#   ./test.sh configs/imagenet/resnet50.yaml https://download.pytorch.org/models/resnet50-0676ba61.pth
#
# Prints top-1/top-5/loss (each validation image counted once) and writes them
# to <work_dir>/test_<checkpoint>.json. Exit codes: 0 ok, 1 error, 2 refused input.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
if [ $# -lt 2 ]; then
  echo "usage: ./test.sh CONFIG CHECKPOINT [NUM_PROCS] [key=value ...]" >&2; exit 2
fi
CONFIG="$1"; CKPT="$2"; shift 2
if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then NUM_PROCS="$1"; shift; fi
if [ ! -f "$CONFIG" ] && [ -f "$ROOT/$CONFIG" ]; then CONFIG="$ROOT/$CONFIG"; fi
if [ -z "${NUM_PROCS:-}" ]; then
  NUM_PROCS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  [ "$NUM_PROCS" -ge 1 ] 2>/dev/null || NUM_PROCS=1
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ "$NUM_PROCS" -eq 1 ]; then
  exec "$PYTHON" -m tools.test "$CONFIG" "$CKPT" "$@"
fi
EXIT_FILE="$(mktemp "${TMPDIR:-/tmp}/blocklab_exit.XXXXXX")"
export BLOCKLAB_EXIT_FILE="$EXIT_FILE"
"$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$NUM_PROCS" \
  -m tools.test "$CONFIG" "$CKPT" "$@"
RC=$?
if [ -s "$EXIT_FILE" ]; then RC="$(cat "$EXIT_FILE")"; fi
rm -f "$EXIT_FILE"
exit "$RC"
