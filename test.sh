#!/usr/bin/env bash
# Evaluate a checkpoint:  ./test.sh [CONFIG] CHECKPOINT [NUM_PROCS] [key=value ...] [--ema] [--out FILE]
#
#   ./test.sh work_dirs/default                          # a work dir: its best.pth (else its newest checkpoint)
#   ./test.sh work_dirs/default/checkpoints/latest 2     # a checkpoint file or latest pointer, 2 processes
#   ./test.sh ce_cifar_resnet20_digits                   # a model-zoo name (verified; its index entry's config)
#   ./test.sh configs/default.yaml work_dirs/default/checkpoints/best.pth   # an explicit config wins
#
# Without CONFIG the config stored in the checkpoint is used (training overrides such
# as data.root included); a URL or a foreign file (torchvision's) needs the CONFIG first.
# Every preprocessing/model key that differs from the checkpoint's stored config is
# printed as a warning line. Prints top-1/top-5/loss (each validation image counted
# once) and writes them to <work_dir>/test_<checkpoint>.json. Processes are started by
# tools/launch.py (as train.sh). Exit codes: 0 ok, 1 error, 2 refused input (one line,
# e.g. a checkpoint that fails its integrity check), 75 stopped by Ctrl-C/SIGTERM (nothing
# written), 76 a process or data worker died.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$ROOT/tools/find_python.sh"
USAGE="usage: ./test.sh [CONFIG] CHECKPOINT_OR_WORK_DIR [NUM_PROCS] [key=value ...]"
if [ $# -lt 1 ]; then echo "$USAGE" >&2; exit 2; fi
CONFIG=()
if [[ "$1" == *.yaml || "$1" == *.yml ]]; then
  if [ $# -lt 2 ]; then echo "$USAGE (a CHECKPOINT after the config)" >&2; exit 2; fi
  C="$1"; shift
  if [ ! -f "$C" ] && [ -f "$ROOT/$C" ]; then C="$ROOT/$C"; fi
  CONFIG=("$C")
fi
CKPT="$1"; shift
NUM_PROCS=""
if [ $# -gt 0 ] && [[ "$1" =~ ^-?[0-9]+$ ]]; then NUM_PROCS="$1"; shift; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m tools.launch tools.test "$NUM_PROCS" ${CONFIG[@]+"${CONFIG[@]}"} "$CKPT" "$@"
