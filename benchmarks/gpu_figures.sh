#!/usr/bin/env bash
# The GPU figures of docs/performance.md in one run of under 8 minutes on one CUDA GPU:
#   1. training throughput of every recipe against the plain Hugging Face loop (bf16 and fp32);
#   2. a DE³ checkpoint trained on the GPU (1 epoch on 8,000 SST-2 sentences, bf16);
#   3. the early-exit engine on the GPU against the plain model: batch 1, batch 32 and pools, bf16 and fp32.
# Results go to $OUT (default results/gpu), with the GPU's name. Run from the repository root, with de3bert
# installed or PYTHONPATH=src, the backbone's weights available (BACKBONE=minilm-l6 by default; mpnet-base needs
# `make mpnet`) and the GLUE data in $GLUE_DIR (default ../shared/data/glue).
set -euo pipefail
PYTHON=${PYTHON:-python}
BACKBONE=${BACKBONE:-minilm-l6}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-results/gpu}
STEPS=${STEPS:-40}
SAMPLES=${SAMPLES:-8000}
LATENCY_INPUTS=${LATENCY_INPUTS:-200}
export GLUE_DIR=${GLUE_DIR:-../shared/data/glue}
mkdir -p "$OUT"
run() { echo "+ $*" >&2; "$@"; }

"$PYTHON" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" \
    | tee "$OUT/device.txt"
for precision in bf16 fp32; do
    run "$PYTHON" benchmarks/train_throughput.py --device "$DEVICE" --precision "$precision" --backbone "$BACKBONE" \
        --steps "$STEPS" --breakdown-steps 10
done
cp results/train_throughput/"$BACKBONE"-cuda-*.{json,md} "$OUT"/ 2>/dev/null || true

checkpoint="$OUT/$BACKBONE-sst2-de3"
run "$PYTHON" -m de3bert.cli train --task sst2 --model "$BACKBONE" --recipe de3 --epochs 1 \
    --max-train-samples "$SAMPLES" --max-length 64 --output "$checkpoint" --device "$DEVICE" --precision bf16 \
    --no-progress
for precision in bf16 fp32; do
    run "$PYTHON" -m de3bert.cli bench "$checkpoint" --device "$DEVICE" --precision "$precision" \
        --latency-inputs "$LATENCY_INPUTS" --output "$OUT/bench-$precision" --no-progress
done
rm -f "$checkpoint"/model.safetensors  # the figures stay, the weights do not travel back
echo "written to $OUT" >&2
