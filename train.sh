#!/usr/bin/env bash
# Train:  ./train.sh [CONFIG] [NUM_PROCS] [key=value ...]
#
#   ./train.sh                                   # configs/default.yaml: CE-ResNet-20 on digits, CPU, minutes
#   ./train.sh configs/ablation/ed_resnet20.yaml 2                  # 2 processes on CPU (gloo)
#   ./train.sh configs/imagenet/cenet/ce_resnet50.yaml 8 data.root=/data/imagenet train.amp=bf16
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 ./train.sh CONFIG 8   # on node0, then
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 MASTER_PORT=29500 ./train.sh CONFIG 8   # on node1
#
# Documentation: docs/training.md.
#
# NUM_PROCS defaults to the number of visible GPUs (1 on CPU); tools/launch.py starts
# the processes (one process: python -m tools.train itself). Starting the same command
# again resumes from the work directory's latest checkpoint; one run at a time owns a
# work directory. SIGTERM, SIGUSR1 or SIGINT (Ctrl-C) to this script or its process
# group: every process saves a checkpoint at the current step and the script exits
# with 75 (run it again to continue); Ctrl-C again stops at once.
# Python: $PYTHON, else the active venv, else ./.venv, else python3/python (the first with
# torch; tools/find_python.sh).
# Exit codes: 0 done, 1 error, 2 refused config (nothing written), 3 nan/inf loss,
# 74 checkpoint write failed, 75 stopped after saving, 76 a process died, never joined or stalled
# (dist.watchdog_s). Each error is one line, whichever process raised it: docs/troubleshooting.md.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$ROOT/tools/find_python.sh"

CONFIG="configs/default.yaml"
NUM_PROCS=""
if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then CONFIG="$1"; shift; fi
if [ $# -gt 0 ] && [[ "$1" =~ ^-?[0-9]+$ ]]; then NUM_PROCS="$1"; shift; fi
if [ ! -f "$CONFIG" ] && [ -f "$ROOT/$CONFIG" ]; then CONFIG="$ROOT/$CONFIG"; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m tools.launch tools.train "$NUM_PROCS" "$CONFIG" "$@"
