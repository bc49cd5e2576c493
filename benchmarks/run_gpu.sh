#!/usr/bin/env bash
# GPU benchmarks of issue 6, in one go or stage by stage (each stage fits a 10-minute slot on an H100).
#
#   bash benchmarks/run_gpu.sh                 # every stage, then the report
#   bash benchmarks/run_gpu.sh check breaks a  # some stages
#   RESULTS_DIR=$OUT/results BATCH=256 bash benchmarks/run_gpu.sh b-eager
#
# Stages:
#   check          --check: each block in bf16 autocast within 1e-2 of fp32, channels_last parity,
#                  WE fold parity, 300 bf16 training steps without NaN, for every model of the suite
#   check-compiled the same checks with torch.compile (compiled vs eager within 1e-4) for CE/ED/WE-ResNet-50
#   breaks         --graph-breaks: torch._dynamo graph breaks of every model (bf16, channels_last)
#   a              plain ResNet-50 vs torchvision's resnet50, training, bf16 + channels_last, eager and
#                  torch.compile in the same run (goal: ours within 3% of torchvision in both)
#   b-eager        whole suite, train + infer, bf16 + channels_last, WE also folded for infer
#   b-compiled-1/2/3  the suite compiled, in three groups (each with plain resnet50 for the ratios;
#                  inductor's on-disk cache makes its repeated compile cheap)
#   tf32           ResNet-50 (ours, torchvision) training in TF32, for reference
#   fp16           plain, CE- and WE-ResNet-50 training in fp16 (GradScaler) + --check in fp16
#   report         gathers the stage tables into $RESULTS_DIR/speed_<device>.md
# Each stage writes $RESULTS_DIR/gpu_<stage>_<device>.{json,md}; the .md starts with the command.
set -uo pipefail
cd "$(dirname "$0")/.."

RESULTS_DIR=${RESULTS_DIR:-benchmarks/results}
BATCH=${BATCH:-256}          # per-GPU batch of the timed runs (ResNet-50 bf16 at 256 needs ~25 GB)
STEPS=${STEPS:-20}           # timed steps per model per round
REPEATS=${REPEATS:-3}        # interleaved rounds
WHEELS=${WHEELS:-shared/wheels}
mkdir -p "$RESULTS_DIR"

python - <<'EOF' || { echo "no usable CUDA device: run benchmarks/benchmark.py with --device cpu instead"; exit 1; }
import torch
assert torch.cuda.is_available()
print(torch.__version__, torch.cuda.get_device_name(0))
EOF
DEV=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace('NVIDIA ', '').replace(' ', '_'))")

# tensorboardX is used by the training tools, not by the benchmark: install it from local wheels
# when it is missing (the GPU box has no network), and carry on without it otherwise.
if ! python -c "import tensorboardX" 2>/dev/null; then
  if ls "$WHEELS"/tensorboard[Xx]-*.whl >/dev/null 2>&1; then
    python -m pip install --no-index --find-links "$WHEELS" tensorboardX \
      || echo "warning: tensorboardX wheel did not install (not needed here)"
  else
    echo "note: tensorboardX missing and no wheel in $WHEELS (not needed for the benchmark)"
  fi
fi

GROUP1=resnet50,ce_resnet50,ed_resnet50
GROUP2=resnet50,we_resnet50,se_resnet50
GROUP3=resnet50,resnext50_32x4d,mobilenet_v2,ce_mobilenet_v2
FAST=(--precision bf16 --channels-last --batch-size "$BATCH" --repeats "$REPEATS")

bench() {  # bench STAGE ARGS...
  local stage=$1; shift
  echo "=== $stage"
  python -m benchmarks.benchmark "$@" --json "$RESULTS_DIR/gpu_${stage}_${DEV}.json" \
    --markdown "$RESULTS_DIR/gpu_${stage}_${DEV}.md"
  echo "=== $stage exit $?"
}

run_stage() {
  case $1 in
    check) bench check --suite resnet50-family --check --precision bf16 --channels-last \
             --batch-size 32 --check-steps 300 ;;
    check-compiled) bench check-compiled --suite resnet50-family --models ce_resnet50,ed_resnet50,we_resnet50 \
                      --check --compile --precision bf16 --channels-last --batch-size 32 --check-steps 100 ;;
    breaks) bench breaks --suite resnet50-family --graph-breaks --precision bf16 --channels-last \
              --batch-size 8 ;;
    a) bench a --suite resnet50-family --models tv_resnet50,resnet50 --mode train "${FAST[@]}" \
         --steps 50 --warmup 10 --compile both ;;
    b-eager) bench b-eager --suite resnet50-family --mode both --fold-we "${FAST[@]}" --steps "$STEPS" --warmup 5 ;;
    b-compiled-1) bench b-compiled-1 --suite resnet50-family --models "$GROUP1" --mode both \
                    "${FAST[@]}" --steps "$STEPS" --warmup 3 --compile ;;
    b-compiled-2) bench b-compiled-2 --suite resnet50-family --models "$GROUP2" --mode both --fold-we \
                    "${FAST[@]}" --steps "$STEPS" --warmup 3 --compile ;;
    b-compiled-3) bench b-compiled-3 --suite resnet50-family --models "$GROUP3" --mode both \
                    "${FAST[@]}" --steps "$STEPS" --warmup 3 --compile ;;
    tf32) bench tf32 --suite resnet50-family --models tv_resnet50,resnet50 --mode train \
            --precision tf32 --channels-last --batch-size "$BATCH" --steps "$STEPS" --repeats "$REPEATS" ;;
    fp16) bench fp16 --suite resnet50-family --models resnet50,ce_resnet50,we_resnet50 --mode train \
            --precision fp16 --channels-last --batch-size "$BATCH" --steps "$STEPS" --repeats "$REPEATS"
          bench fp16-check --suite resnet50-family --models resnet50,ce_resnet50,we_resnet50 --check \
            --precision fp16 --channels-last --batch-size 32 --check-steps 300 ;;
    report)
      out="$RESULTS_DIR/speed_${DEV}.md"
      { echo "# Speed on $DEV"
        echo
        echo "Made by \`bash benchmarks/run_gpu.sh\` (stages below; each section starts with its command)."
        echo "Throughput is images/s at the median step; 'vs base' is the ratio to plain resnet50."
        for s in a b-eager b-compiled-1 b-compiled-2 b-compiled-3 tf32 fp16 check check-compiled fp16-check breaks; do
          f="$RESULTS_DIR/gpu_${s}_${DEV}.md"
          [ -f "$f" ] && { echo; echo "## $s"; echo; cat "$f"; }
        done; } > "$out"
      echo "wrote $out" ;;
    *) echo "unknown stage '$1'"; exit 2 ;;
  esac
}

STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(check check-compiled breaks a b-eager b-compiled-1 b-compiled-2 b-compiled-3 tf32 fp16 report)
for s in "${STAGES[@]}"; do run_stage "$s"; done
