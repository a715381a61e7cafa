#!/usr/bin/env bash
# One prepared GPU session (device tool), in one of two parts (one 10-minute command each):
#   PART=eigs  (default; ≈ 9.5 min with its timeouts: run with timeout_s 600, EIG_COMPILE=0;
#              EIG_ONLY=1 stops after the Hessian benchmark, ≈ 5 min; EIG_VARIANTS picks the product
#              variants, EIG_CKPT=path a trained checkpoint instead of the random init)
#              spectra eigen/density benchmark against PyHessian and curvlinops,
#              product variants eager / CUDA graphs (/ torch.compile with EIG_COMPILE=1),
#              all classes with the fastest one; then training speed (eager, graphs, 8 concurrent,
#              3 on streams vs an ensemble of 3, fp32 channels_last, bf16 + channels_last).
#   PART=table the CIFAR-10-LT table runs (METHODS=..., BUDGET=seconds, default 550; ≈ 700 s of
#              training in all on an H200, so two calls: the second resumes, see REPRODUCTION.md).
#   PART=gpucheck  CE alone for 200 epochs, twice at once in two processes: eager (--compile off)
#              and CUDA graphs, to compare with the table's CE row (graphs replayed on 8 streams);
#              ≈ 6 min on an H200; CHECK_BUDGET (default 420 s) caps each run, so timeout_s 480 suffices.
#   PART=figure  ce-drw and ce-drw-sam (the paper's figure: per-class |λmin/λmax| over the epochs; FIG_METHODS=
#              ce-drw,ce-drw-sam,ce-drw-pgd adds a run on another stream; with 3 runs use SNAP_EVERY=40, or the
#              snapshot archives pass the 64 MiB that comes back),
#              weights-only snapshots every 20 epochs (SNAP_EVERY) + epoch 1, back as fig*.tgz (≤ 16 MB each);
#              FIG_ROWS=ce-drw-pgd,ce-drw-lpf trains table rows on more streams of the same process, without
#              snapshots (their numbers in figure.tgz, their last.pt with the others' in last*.tgz);
#              FIG_BUDGET seconds (default 480) then a clean stop; a second call resumes (like PART=table).
#              Then spectra sweep of the snapshots into figure_spectra.h5 for SWEEP_BUDGET s (default 240);
#              what is left, on any machine: unpack figure.tgz, fig*.tgz and last*.tgz into .gpu/, copy figure_spectra.h5
#              beside them and run the same sweep on .gpu/figure/ce-drw .gpu/figure/ce-drw-sam (stored entries are
#              skipped: keys are checkpoint SHA-256 + settings, not paths or devices).
#   PART=jpeg  what one more JPEG pass costs at full scale (the table's accuracy gap, REPRODUCTION.md): CE for 200
#              epochs on the JPEG copy and on copies re-encoded at JPEG_QUALITIES (default "50 30"), one process each,
#              JPEG_BUDGET s each (default 300); metrics back in jpeg.tgz; ≈ 6 min on an H200.
#   PART=compile  the Hessian benchmark with torch.compile alone (what EIG_COMPILE=1 adds to PART=eigs).
#   PART=levers  TF32 products (fast mode) and fp32 blocks of 1 and 2 for every class (EIG_CKPT, REF_JSON), ≈ 5 min.
#   PART=trainspeed  training speed alone: fp32 eager / graphs / inductor+graphs, 8 on streams, channels_last,
#              bf16 + channels_last (what PART=eigs runs after its Hessian benchmark), ≈ 5 min.
#   PART=ensemble training speed of 3 runs on CUDA streams vs one vectorised ensemble of 3 (≈ 80 s).
#   PART=table,eigs  several parts, in that order.
# Needs .gpu/ (carried, git-ignored): cifar10-jpeg.tar.gz, train_labels.npy,
# to_batches.py and whl/ (pyhessian, curvlinops, einconv, einops, linear_operator,
# opt_einsum wheels). Results -> $OUT. To build .gpu/ in a fresh checkout:
#   mkdir -p .gpu && cp ../shared/data/cifar10/{cifar10-jpeg.tar.gz,train_labels.npy,to_batches.py} .gpu/
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .gpu/whl pyhessian==0.1 curvlinops-for-pytorch==3.0.1 \
#     einconv einops linear_operator opt-einsum
# Dry run on the CPU: DEVICE=cpu SMALL=1 OUT=/tmp/gpu_out bash benchmarks/gpu_session.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; DEVICE=${DEVICE:-cuda}; SMALL=${SMALL:-0}; PART=${PART:-eigs}
mkdir -p "$OUT" /tmp/shim
[ "$PART" = table ] || python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>&1 | tail -2
ln -sfn "$PWD/cli" /tmp/shim/spectra_cli   # the CLI package without an install
export PYTHONPATH="$PWD:/tmp/shim:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; python3 -c "import torch; print('torch', torch.__version__)"; } | tee "$OUT/machine.txt"
[ -d /tmp/data/cifar-10-batches-py ] || python3 .gpu/to_batches.py /tmp/data >/dev/null
if [ "$SMALL" = 1 ]; then
  EIG_ARGS="--arch resnet8 --max-samples 400 --block-sizes 1 4 --batch-size 32"; EPOCHS=1; BUDGET=120; EXTRA="--max-train-samples 256 --methods ce,ce-drw-sam"
  SPEED_ARGS="--steps 2"
else
  EIG_ARGS="--arch resnet32 --batch-size ${EIG_BATCH:-512} --block-sizes 1 4 8"; EPOCHS=200; BUDGET=${BUDGET:-550}
  EXTRA="--methods ${METHODS:-ce,ce-sam,ce-drw,ce-drw-sam,ldam-drw,ldam-drw-sam,vs,vs-sam}"; SPEED_ARGS=""
fi
part_compile() {
echo "== spectra with torch.compile (one padded static shape per block size)"
timeout ${COMPILE_TIMEOUT:-150} python3 benchmarks/eigs_speed.py --device "$DEVICE" --dataset cifar10-lt --data-root /tmp/data \
  --compare-class 3 --skip-others --no-density --variants compile $EIG_ARGS --block-sizes 4 ${EIG_CKPT:+--checkpoint "$EIG_CKPT"} --out "$OUT/eigs_${DEVICE}_compiled.json" 2>&1 \
  | grep -v Warning > "$OUT/eigs_${DEVICE}_compiled.log"; tail -25 "$OUT/eigs_${DEVICE}_compiled.log"
}
part_levers() {
# The levers left after CUDA graphs, on a trained checkpoint (EIG_CKPT): TF32 products (fast mode) against
# the float64 reference of an earlier PART=eigs run (REF_JSON, same checkpoint; recomputed when unset), then
# fp32 with blocks of 1 and 2 (PART=eigs tried 1/4/8) for every class. ≈ 5 min on an H200.
local common="--device $DEVICE --dataset cifar10-lt --data-root /tmp/data --compare-class 3 --variants graphs --skip-others --no-density --all-classes"
echo "== TF32 products: every class's λmax/λmin and density"
timeout ${TF32_TIMEOUT:-170} python3 benchmarks/eigs_speed.py $common $EIG_ARGS --block-sizes 1 2 4 --product-blocks 4 8 --tf32 \
  ${REF_JSON:+--reference-json "$REF_JSON"} ${EIG_CKPT:+--checkpoint "$EIG_CKPT"} --out "$OUT/eigs_${DEVICE}_tf32.json" 2>&1 \
  | grep -v "Warning\|lanczos:" > "$OUT/eigs_${DEVICE}_tf32.log"; tail -14 "$OUT/eigs_${DEVICE}_tf32.log"
echo "== fp32, blocks of 1 and 2: every class's λmax/λmin"
timeout ${FP32_TIMEOUT:-140} python3 benchmarks/eigs_speed.py $common $EIG_ARGS --block-sizes 1 2 --product-blocks 2 --no-sweep-density \
  ${REF_JSON:+--reference-json "$REF_JSON"} ${EIG_CKPT:+--checkpoint "$EIG_CKPT"} --out "$OUT/eigs_${DEVICE}_fp32_b12.json" 2>&1 \
  | grep -v "Warning\|lanczos:" > "$OUT/eigs_${DEVICE}_fp32_b12.log"; tail -13 "$OUT/eigs_${DEVICE}_fp32_b12.log"
}
part_ensemble() {
echo "== 3 runs: CUDA streams vs one vectorised ensemble step"
timeout ${ENSEMBLE_TIMEOUT:-80} python3 benchmarks/train_speed.py --device "$DEVICE" --data-root /tmp/data --epochs 1 $SPEED_ARGS \
  --modes graphs --concurrent 3 --ensemble 3 > "$OUT/train_speed_ensemble.log" 2>&1; tail -6 "$OUT/train_speed_ensemble.log"
}
part_trainspeed() {
# Training speed of CE+DRW+SAM, one epoch per mode: fp32 eager / CUDA graphs / inductor + graphs (max),
# 8 runs on streams; then channels_last, then bf16 autocast + channels_last. ≈ 5 min on an H200.
echo "== training speed, fp32 (${SPEED_MODES:-off,graphs,max}; 8 concurrent on streams)"
timeout ${SPEED_TIMEOUT:-200} python3 benchmarks/train_speed.py --device "$DEVICE" --data-root /tmp/data --epochs 1 $SPEED_ARGS \
  --modes ${SPEED_MODES:-off,graphs,max} --concurrent 8 > "$OUT/train_speed.log" 2>&1; tail -15 "$OUT/train_speed.log"
echo "== training speed, fp32 (TF32 convolutions) with channels_last, graphs"
timeout ${CL_TIMEOUT:-45} python3 benchmarks/train_speed.py --device "$DEVICE" --data-root /tmp/data --epochs 1 $SPEED_ARGS \
  --channels-last --modes graphs > "$OUT/train_speed_cl.log" 2>&1; tail -4 "$OUT/train_speed_cl.log"
echo "== training speed, bf16 autocast + channels_last, graphs vs inductor+graphs"
timeout ${BF16_TIMEOUT:-90} python3 benchmarks/train_speed.py --device "$DEVICE" --data-root /tmp/data --epochs 1 $SPEED_ARGS \
  --amp bf16 --channels-last --modes ${BF16_MODES:-graphs,max} > "$OUT/train_speed_bf16.log" 2>&1; tail -6 "$OUT/train_speed_bf16.log"
}
part_eigs() {
echo "== spectra eigenvalues/density benchmark"
timeout ${EIG_TIMEOUT:-270} python3 benchmarks/eigs_speed.py --device "$DEVICE" --dataset cifar10-lt --data-root /tmp/data \
  --compare-class 3 --all-classes --variants ${EIG_VARIANTS:-eager eager-db eager-kept graphs} $EIG_ARGS \
  ${EIG_CKPT:+--checkpoint "$EIG_CKPT"} --out "$OUT/eigs_${DEVICE}.json" 2>&1 \
  | grep -v Warning > "$OUT/eigs_${DEVICE}.log"
tail -25 "$OUT/eigs_${DEVICE}.log"
[ "${EIG_COMPILE:-0}" = 1 ] && part_compile
[ "${EIG_ONLY:-0}" = 1 ] && return  # EIG_ONLY=1: the Hessian benchmark alone (≈ 5 min), no training speed
part_trainspeed
part_ensemble
}
# run_summary SUMMARY LABEL LOG: one line of a run's final and best accuracy and speed (the log's tail without a summary)
run_summary() {
python3 -c "import json,sys; s=json.load(open(sys.argv[1])); f=s['final']; print(sys.argv[2], 'epoch', f['epoch'], 'acc', f['acc'], 'tail', f['tail_acc'], 'best', s['best'], 's/epoch', s['seconds_per_epoch'])" \
  "$1" "$2" 2>/dev/null || tail -3 "$3"
}
part_gpucheck() {
local budget=${CHECK_BUDGET:-420}
echo "== CE alone, eager vs CUDA graphs, two processes (budget ${budget}s each)"
for mode in off graphs; do
  timeout $((budget + 40)) python3 -m spectra train --method ce --dataset cifar10-lt --data-root /tmp/data --out ".gpucheck/ce-$mode" \
    --epochs $EPOCHS --compile $mode --eval-every ${EVAL_EVERY:-5} --device "$DEVICE" --no-progress --time-limit-s "$budget" \
    $( [ "$SMALL" = 1 ] && echo --max-train-samples 256 --max-test-samples 500 ) > "$OUT/gpucheck_$mode.log" 2>&1 &
done
wait
for mode in off graphs; do
  mkdir -p "$OUT/gpucheck/ce-$mode"; cp .gpucheck/ce-$mode/{summary.json,metrics.jsonl,config.json} "$OUT/gpucheck/ce-$mode/" 2>/dev/null
  run_summary ".gpucheck/ce-$mode/summary.json" "$mode" "$OUT/gpucheck_$mode.log"
done
}
part_jpeg() {
local budget=${JPEG_BUDGET:-300} qualities=${JPEG_QUALITIES:-50 30} J=.jpeg-runs
mkdir -p "$J"
for q in $qualities; do  # ≈ 20 s each (Pillow, 60,000 images)
  [ -d "/tmp/data_q$q" ] || python3 benchmarks/jpeg_reencode.py --data-root /tmp/data --quality "$q" --out "/tmp/data_q$q" | tee "$J/reencode_q$q.json"
done
echo "== CE on the JPEG copy and on re-encoded copies (${qualities}), one process each (budget ${budget}s)"
for q in shipped $qualities; do
  root=/tmp/data; [ "$q" = shipped ] || root="/tmp/data_q$q"
  timeout $((budget + 40)) python3 -m spectra train --method ce --dataset cifar10-lt --data-root "$root" --out "$J/ce-$q" \
    $( [ -f "$J/ce-$q/last.pt" ] && echo --resume ) --epochs $EPOCHS --eval-every ${EVAL_EVERY:-5} --device "$DEVICE" \
    --no-progress --time-limit-s "$budget" $( [ "$SMALL" = 1 ] && echo --max-train-samples 256 --max-test-samples 500 ) \
    > "$J/ce-$q.log" 2>&1 &
done
wait
for q in shipped $qualities; do
  run_summary "$J/ce-$q/summary.json" "$q" "$J/ce-$q.log"
done
tar czf "$OUT/jpeg.tgz" --exclude='*.pt' "$J" 2>/dev/null
}
# Shared by part_table and part_figure. runs_dir DIR NAME: the runs live in DIR (git-ignored, so a warm
# machine keeps them between calls), seeded from a carried .gpu/NAME; prints --resume when there are runs.
runs_dir() { [ -d "$1" ] || { [ -d ".gpu/$2" ] && cp -r ".gpu/$2" "$1"; }; [ -d "$1" ] && echo --resume; }
# pack_parts DIR NAME PREFIX N FILES...: FILES into $OUT/PREFIX<i>.tgz, N per archive, DIR shown as NAME
# (a fetched file must stay under 16 MB, and at most 8 files come back).
pack_parts() {
local dir=$1 name=$2 prefix=$3 n=$4; shift 4
for f in "$@"; do [ -e "$f" ] && echo "$f"; done | xargs -r -n "$n" | nl -nln | while read -r i f; do tar czf "$OUT/$prefix$i.tgz" --transform "s|^$dir|$name|" $f; done
}
part_table() {
# The runs live in .table-runs/ (git-ignored, so a warm machine keeps it between calls): a
# second call on the same machine resumes them. Across sessions, unpack the returned
# table.tgz and ckpt*.tgz into .gpu/ (giving .gpu/table/<method>/{last.pt,metrics.jsonl,...})
# and carry .gpu as usual: they are copied in and resumed.
TABLE=.table-runs
RESUME_ARG=$(runs_dir "$TABLE" table)
echo "== CIFAR-10-LT table (budget ${BUDGET}s) ${RESUME_ARG}"
timeout $((BUDGET + 30)) python3 benchmarks/reproduce_cifar10lt.py --data-root /tmp/data --out "$TABLE" $RESUME_ARG \
  --epochs $EPOCHS --device "$DEVICE" --time-budget-s "$BUDGET" --eval-every ${EVAL_EVERY:-5} --mode ${TABLE_MODE:-auto} $EXTRA > "$OUT/table.log" 2>&1
tail -20 "$OUT/table.log"; cat "$TABLE/results.md" 2>/dev/null
tar czf "$OUT/table.tgz" --exclude='*.pt' --transform "s|^$TABLE|table|" "$TABLE" 2>/dev/null
# final weights for per-class analysis elsewhere, 3 runs per archive
pack_parts "$TABLE" table ckpt 3 "$TABLE"/*/last.pt
}
part_figure() {
# Same pattern as part_table: runs in .figure-runs/ (git-ignored), seeded from a carried .gpu/figure/.
# At most 8 files come back from $OUT: logs go into figure.tgz, snapshots 8 per archive (3 archives).
local FIG=.figure-runs budget=${FIG_BUDGET:-480} methods=${FIG_METHODS:-ce-drw,ce-drw-sam} rows=${FIG_ROWS:-}
local resume; resume=$(runs_dir "$FIG" figure)
local no_snapshots=""; for r in ${rows//,/ }; do no_snapshots+=" --save-every-for $r=$EPOCHS"; done
mkdir -p "$FIG"
echo "== $methods with snapshots every ${SNAP_EVERY:-20} epochs${rows:+, $rows without} (budget ${budget}s) ${resume}"
timeout $((budget + 30)) python3 benchmarks/reproduce_cifar10lt.py --data-root /tmp/data --out "$FIG" $resume \
  --epochs $EPOCHS --device "$DEVICE" --time-budget-s "$budget" --eval-every ${EVAL_EVERY:-5} --save-every ${SNAP_EVERY:-20} \
  --mode ${TABLE_MODE:-auto} --set snapshot_optimizer=false --methods "$methods${rows:+,$rows}" $no_snapshots \
  $( [ "$SMALL" = 1 ] && echo --max-train-samples 256 ) > "$FIG/figure.log" 2>&1
local rc=$?
tail -8 "$FIG/figure.log"
[ $rc = 2 ] && { echo "== refused (see above): nothing trained"; return; }
# The per-class extremes of the snapshots, for what time is left (SWEEP_BUDGET); the store commits entry by
# entry, so a sweep cut off here is finished elsewhere with the same command (stored entries are skipped).
echo "== per-class λmax/λmin of the snapshots (budget ${SWEEP_BUDGET:-240}s)"
timeout ${SWEEP_BUDGET:-240} python3 -m spectra sweep $(printf "$FIG/%s " ${methods//,/ }) --classes all --out "$FIG/figure_spectra.h5" \
  --data-root /tmp/data --max-samples ${SWEEP_SAMPLES:-100} --tol 1e-4 --max-iter 100 --device "$DEVICE" \
  $( [ "$DEVICE" = cuda ] && echo --cuda-graphs ) > "$FIG/figure_sweep.log" 2>&1
tail -3 "$FIG/figure_sweep.log"; python3 -m spectra info "$FIG/figure_spectra.h5" 2>/dev/null | tail -3
cp "$FIG/figure_spectra.h5" "$OUT/" 2>/dev/null  # not its .lock sidecar: at most 8 files come back
# logs and metrics in one archive; the weights-only snapshots of the figure's runs (1.9 MB each) 8 per
# archive; every run's last.pt (3.7 MB with its momentum: resumes it) 3 per archive
tar czf "$OUT/figure.tgz" --exclude='*.pt' --exclude='figure_spectra.h5*' --transform "s|^$FIG|figure|" "$FIG" 2>/dev/null
# Only the grid (epoch 1 and every SNAP_EVERY-th): a run stopped by the budget also keeps its stop epoch, and
# with those the snapshots would need a fourth archive, one file more than can come back.
pack_parts "$FIG" figure fig 8 $(for f in $(printf "$FIG/%s/ckpt_epoch*.pt " ${methods//,/ }); do
  [ -e "$f" ] || continue; e=$(basename "$f" .pt); e=$((10#${e#ckpt_epoch}))
  { [ $e = 1 ] || [ $((e % ${SNAP_EVERY:-20})) = 0 ]; } && echo "$f"; done)
pack_parts "$FIG" figure last 3 "$FIG"/*/last.pt
}
for part in ${PART//,/ }; do "part_$part"; done
ls -la "$OUT"
