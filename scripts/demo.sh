#!/usr/bin/env bash
# Quick start, main job: set up, export a model, calibrate OK/NG on normal sample images, run edge-detect on sample
# images, leave overlays, masks and records.
# Uses zero-shot CLIP with seeded RANDOM ViT-B-16 weights (no real weights exist offline): the maps are
# meaningless, the pipeline is the real one. See README "Usage" for AA-CLIP / Crane with real weights.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
OUT=${OUT:-demo-out}
rm -rf "$OUT/samples"
.venv/bin/python -m clipad.calibration.samples "$OUT/samples" --count 40 >/dev/null
.venv/bin/export-engine --model clip --random-init --arch ViT-B-16 --image-size 224 \
    --class-name "textured surface" --output "$OUT/model"
.venv/bin/edge-calibrate --model "$OUT/model" --normal "$OUT/samples/*_good.png" --target-fpr 0.1
.venv/bin/edge-detect --model "$OUT/model" --source "$OUT/samples" \
    --save "$OUT/overlays" --save-maps "$OUT/maps" --save-masks "$OUT/masks" --jsonl "$OUT/results.jsonl"
echo "overlays: $OUT/overlays/   maps: $OUT/maps/   masks: $OUT/masks/   records: $OUT/results.jsonl"
