#!/usr/bin/env bash
# Evaluate a checkpoint:  ./test.sh CONFIG CHECKPOINT [NUM_PROCS] [key=value ...] [--ema]
#
#   ./test.sh configs/default.yaml work_dirs/default/checkpoints/best.pth
#   ./test.sh configs/imagenet/ce_resnet50.yaml ce_resnet50 8      # a model-zoo name (downloaded, verified)
#   ./test.sh configs/imagenet/resnet50.yaml https://download.pytorch.org/models/resnet50-0676ba61.pth
#
# Prints top-1/top-5/loss (each validation image counted once) and writes them
# to <work_dir>/test_<checkpoint>.json. Processes are started by tools/launch.py
# (as train.sh). Exit codes: 0 ok, 1 error, 2 refused input, 75 stopped by Ctrl-C/SIGTERM (nothing
# written), 76 a process or data worker died.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
if [ $# -lt 2 ]; then
  echo "usage: ./test.sh CONFIG CHECKPOINT [NUM_PROCS] [key=value ...]" >&2; exit 2
fi
CONFIG="$1"; CKPT="$2"; shift 2
NUM_PROCS=""
if [ $# -gt 0 ] && [[ "$1" =~ ^-?[0-9]+$ ]]; then NUM_PROCS="$1"; shift; fi
if [ ! -f "$CONFIG" ] && [ -f "$ROOT/$CONFIG" ]; then CONFIG="$ROOT/$CONFIG"; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m tools.launch tools.test "$NUM_PROCS" "$CONFIG" "$CKPT" "$@"
