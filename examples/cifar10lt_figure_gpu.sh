#!/usr/bin/env bash
# The paper's per-class saddle figure on the full CIFAR-10-LT, on one GPU:
# train ResNet-32 with CE+DRW and CE+DRW+SAM for 200 epochs (checkpoint every
# 10), compute λmax / λmin of the per-class Hessian of EVERY checkpoint and
# class, the spectral density of the tail class (9, truck) at the end, and plot.
#
#   DATA_ROOT=~/data bash examples/cifar10lt_figure_gpu.sh          # all of it
#   DRY_RUN=1 bash examples/cifar10lt_figure_gpu.sh                 # print the commands only
#
# DATA_ROOT must contain cifar-10-batches-py/ (the official python pickles;
# DOWNLOAD=1 fetches them, md5-checked). Knobs (environment): OUT (folder,
# default runs/cifar10lt-figure), EPOCHS (200), SAVE_EVERY (10), DEVICE (cuda),
# MAX_SAMPLES (per-class Hessian samples; empty = every sample of the class,
# as in the paper; CIFAR-10-LT has 5000 … 50), TOL (1e-4).
#
# Cost on one GPU (see docs/training.md and docs/performance.md for measured
# figures): training is ~2 × 200 epochs of ResNet-32 on 12,406 images; the
# sweep is 2 runs × 21 checkpoints × 10 classes = 420 eigs jobs (measured on an
# H200 for one trained checkpoint, every sample of every class, tol 1e-4: 62 s
# for its 10 classes, so ≈ 45 min for the 42 checkpoints; --max-samples 500 cuts
# the 5,000-image head class). Every step resumes: rerun the script after an
# interruption and it continues.
set -euo pipefail

DATA_ROOT=${DATA_ROOT:-${SPECTRA_DATA_ROOT:-$HOME/.cache/spectra/data}}
OUT=${OUT:-runs/cifar10lt-figure}
EPOCHS=${EPOCHS:-200}
SAVE_EVERY=${SAVE_EVERY:-10}
DEVICE=${DEVICE:-cuda}
MAX_SAMPLES=${MAX_SAMPLES:-}
TOL=${TOL:-1e-4}
TAIL_CLASS=9

run() {
    echo "+ $*" >&2
    if [ -z "${DRY_RUN:-}" ]; then "$@"; fi
}

download=()
if [ -n "${DOWNLOAD:-}" ]; then download=(--download); fi
samples=()
if [ -n "$MAX_SAMPLES" ]; then samples=(--max-samples "$MAX_SAMPLES"); fi

# 1. Train both methods (a rerun resumes from last.pt).
for method in ce-drw ce-drw-sam; do
    resume=()
    if [ -f "$OUT/$method/last.pt" ]; then resume=(--resume); fi
    run spectra train --method "$method" --dataset cifar10-lt --data-root "$DATA_ROOT" "${download[@]}" \
        --epochs "$EPOCHS" --save-every "$SAVE_EVERY" --device "$DEVICE" --out "$OUT/$method" "${resume[@]}"
    download=()
done

# 2. Every checkpoint × every class: λmax, λmin (float64 products; a rerun skips stored entries).
run spectra sweep "$OUT/ce-drw" "$OUT/ce-drw-sam" --classes all --out "$OUT/results.h5" \
    --tol "$TOL" --dtype float64 --device "$DEVICE" --data-root "$DATA_ROOT" "${samples[@]}"

# 3. Spectral density of the tail class at the last epoch, both runs.
run spectra sweep "$OUT/ce-drw/ckpt_epoch$(printf %04d "$EPOCHS").pt" \
    "$OUT/ce-drw-sam/ckpt_epoch$(printf %04d "$EPOCHS").pt" --classes "$TAIL_CLASS" --density \
    --out "$OUT/results.h5" --tol "$TOL" --dtype float64 --device "$DEVICE" --data-root "$DATA_ROOT" "${samples[@]}"

# 4. The figures.
run spectra plot ratio "$OUT/results.h5" -o "$OUT/ratio.png"
run spectra plot density "$OUT/results.h5" --class "$TAIL_CLASS" --epoch "$EPOCHS" --run ce-drw --run ce-drw-sam \
    -o "$OUT/density-class$TAIL_CLASS.png"
run spectra info "$OUT/results.h5"
echo "figures: $OUT/ratio.png $OUT/density-class$TAIL_CLASS.png" >&2
