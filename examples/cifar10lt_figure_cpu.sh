#!/usr/bin/env bash
# The paper's per-class saddle figure at CPU scale, in about an hour on 2 cores:
# CE+DRW and CE+DRW+SAM on the full CIFAR-10-LT (12,406 images), but ResNet-8
# and 40 epochs (DRW and the learning-rate decays scale with the epochs: 32, 36),
# with the per-class λmax / λmin recorded during training (--spectra-every:
# no second pass), the spectral density of the tail class at the end, and plots.
# The full-size figure (ResNet-32, 200 epochs) is examples/cifar10lt_figure_gpu.sh.
#
#   DATA_ROOT=~/data bash examples/cifar10lt_figure_cpu.sh          # all of it
#   DRY_RUN=1 bash examples/cifar10lt_figure_cpu.sh                 # print the commands only
#
# DATA_ROOT must contain cifar-10-batches-py/ (`spectra train ... --download`
# fetches it where there is internet). Knobs
# (environment): OUT (default runs/cifar10lt-figure-cpu), ARCH (resnet8), EPOCHS
# (40), SPECTRA_EVERY (4), SAMPLES (per-class Hessian samples, 100), SEED (0),
# RHO (SAM's ρ; empty = the preset's 0.5, which at this scale leaves the tail
# classes unlearned: 45.3 % overall, 7.4 % tail against CE+DRW's 67.9 / 65.4;
# RHO=0.1 gives 67.1 / 65.3 — REPRODUCTION.md), AMP (bf16: autocast, 1.1–1.6×
# faster on CPUs with AVX512-BF16, another rounding; empty = fp32, the recipe's). The two runs train at once, one
# thread each. Measured on a 2-core CPU: 26–28 s per epoch for CE+DRW, 45–54 s
# for CE+DRW+SAM, 1.5–2.5 min per probe of the 10 classes, ≈ 1 hour in all.
# A rerun resumes unfinished runs and skips stored results.
set -euo pipefail

DATA_ROOT=${DATA_ROOT:-${SPECTRA_DATA_ROOT:-$HOME/.cache/spectra/data}}
OUT=${OUT:-runs/cifar10lt-figure-cpu}
ARCH=${ARCH:-resnet8}
EPOCHS=${EPOCHS:-40}
SPECTRA_EVERY=${SPECTRA_EVERY:-4}
SAMPLES=${SAMPLES:-100}
SEED=${SEED:-0}
RHO=${RHO:-}
AMP=${AMP:-}
TAIL_CLASS=9

run() {
    echo "+ $*" >&2
    if [ -z "${DRY_RUN:-}" ]; then "$@"; fi
}

# 1. Both runs at once (one thread each), per-class spectra after epoch 1 and every SPECTRA_EVERY epochs.
pids=()
for method in ce-drw ce-drw-sam; do
    extra=()
    if [ -f "$OUT/$method/summary.json" ]; then continue; fi   # finished
    if [ -f "$OUT/$method/last.pt" ]; then extra=(--resume); fi   # with the same settings as the run
    if [ "$method" = ce-drw-sam ] && [ -n "$RHO" ]; then extra+=(--rho "$RHO"); fi
    if [ -n "$AMP" ]; then extra+=(--amp "$AMP"); fi
    OMP_NUM_THREADS=1 run spectra train --method "$method" --dataset cifar10-lt --data-root "$DATA_ROOT" \
        --epochs "$EPOCHS" --seed "$SEED" --eval-every 2 --save-every "$SPECTRA_EVERY" --spectra-every "$SPECTRA_EVERY" \
        --set arch="$ARCH" --set spectra_samples_per_class="$SAMPLES" --device cpu --no-progress \
        --out "$OUT/$method" "${extra[@]}" &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done

# 2. |λmin/λmax| per class over the epochs: the two runs' own results files side by side.
run spectra plot ratio "$OUT/ce-drw/results.h5" "$OUT/ce-drw-sam/results.h5" -o "$OUT/ratio.png"

# 3. Spectral density of the tail class at the last epoch, both runs, overlaid.
last=$(printf %04d "$EPOCHS")
run spectra sweep "$OUT/ce-drw/ckpt_epoch$last.pt" "$OUT/ce-drw-sam/ckpt_epoch$last.pt" --classes "$TAIL_CLASS" \
    --density --probes 4 --steps 80 --max-samples "$SAMPLES" --tol 1e-4 --device cpu --data-root "$DATA_ROOT" \
    --out "$OUT/density.h5"
run spectra plot density "$OUT/density.h5" --class "$TAIL_CLASS" --epoch "$EPOCHS" --run ce-drw --run ce-drw-sam \
    -o "$OUT/density-class$TAIL_CLASS.png"
run spectra info "$OUT/ce-drw/results.h5"
echo "figures: $OUT/ratio.png $OUT/density-class$TAIL_CLASS.png" >&2
