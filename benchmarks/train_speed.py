"""Training speed of spectra.train: seconds per epoch and images per second,
eager versus optimised (CUDA-graph capture / torch.compile), one method.

    python benchmarks/train_speed.py --device cuda --data-root DIR          # real CIFAR-10-LT
    python benchmarks/train_speed.py --device cpu --steps 5                 # quick CPU figure
    python benchmarks/train_speed.py --device cuda --concurrent 3 --ensemble 3   # 3 runs: streams vs one vectorised step

Without --data-root a synthetic CIFAR-10-LT-sized set (12,406 random images)
is used; the speed does not depend on pixel values. On the CPU only the first
``--steps`` steps of an epoch are timed and scaled to the epoch's step count.
"""
from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from spectra.datasets import lt_class_counts
from spectra.train import METHODS, Ensemble, Trainer, TrainConfig, resolve_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import non_negative, positive  # noqa: E402

COMPILE_MODES = ("off", "graphs", "inductor", "max")


def write_synthetic_cifar10(root: Path, seed: int = 0) -> None:
    """Balanced 5000-per-class CIFAR-10 files (random pixels), LT subsampled later."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(10), 5000)
    data = rng.integers(0, 256, size=(50000, 3072), dtype=np.uint8)
    for i in range(5):
        part = slice(i * 10000, (i + 1) * 10000)
        with open(folder / f"data_batch_{i + 1}", "wb") as fh:
            pickle.dump({"data": data[part], "labels": labels[part].tolist()}, fh)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({"data": data[:1000], "labels": labels[:1000].tolist()}, fh)


def config(args: argparse.Namespace, root: str, mode: str, channels_last: bool | None) -> TrainConfig:
    return resolve_config(
        args.method, "cifar10-lt", data_root=root, device=args.device, compile=mode, amp=args.amp, arch=args.arch,
        channels_last=channels_last, batch_size=args.batch_size, progress=False, max_test_samples=1000,
        max_train_samples=args.max_train_samples,
    )


def measure(mode: str, args: argparse.Namespace, root: str, channels_last: bool | None) -> dict[str, float | str]:
    cfg = config(args, root, mode, channels_last)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, out, log=print)
        trainer.prepare()
        steps_per_epoch = trainer.batches.steps
        timed = None if args.steps is None else args.steps
        t0 = time.perf_counter()
        trainer.train_epoch(1, max_steps=timed if timed is None else min(timed, 3))  # warm-up: capture / compile
        warmup = time.perf_counter() - t0
        per_epoch = []
        for epoch in range(2, 2 + args.epochs):
            stats = trainer.train_epoch(epoch, max_steps=timed)
            steps = steps_per_epoch if timed is None else min(timed, steps_per_epoch)
            per_epoch.append(stats["epoch_time_s"] * steps_per_epoch / steps)
        used = "eager (capture failed)" if trainer._graph_failed else trainer.compile_mode
        layout = "NHWC" if trainer.channels_last else "NCHW"
    sec = float(np.median(per_epoch))
    return {"mode": f"{used}, {layout}", "s_per_epoch": sec, "img_per_s": steps_per_epoch * args.batch_size / sec, "warmup_s": warmup}


def measure_concurrent(n: int, args: argparse.Namespace, root: str) -> dict[str, float]:
    """``n`` runs of the method in lockstep, one CUDA stream each (as
    ``spectra.train.fit_many``): seconds per epoch of all ``n`` together."""
    import contextlib

    cfg = config(args, root, args.concurrent_mode, args.channels_last)
    with tempfile.TemporaryDirectory() as out:
        trainers = [Trainer(cfg, Path(out) / str(i), log=print) for i in range(n)]
        cuda = args.device.startswith("cuda")
        streams = [torch.cuda.Stream() if cuda else None for _ in trainers]
        on = lambda st: torch.cuda.stream(st) if st is not None else contextlib.nullcontext()  # noqa: E731
        for t in trainers:
            t.prepare()
        times = []
        for epoch in (1, 2, 3):  # epoch 1: warm-up (capture)
            t0 = time.perf_counter()
            steps = [None] * n
            for k, (t, st) in enumerate(zip(trainers, streams)):
                with on(st):
                    steps[k] = t.start_train_epoch(epoch, max_steps=args.steps)
            for i in range(max(steps)):
                for t, st in zip(trainers, streams):
                    with on(st):
                        t.train_step(i)
            for t, st in zip(trainers, streams):
                with on(st):
                    t.finish_train_epoch()
            scale = trainers[0].batches.steps / max(steps)
            times.append((time.perf_counter() - t0) * scale)
    sec = float(np.median(times[1:]))
    return {"s_per_epoch_all": sec, "img_per_s_all": n * trainers[0].batches.steps * args.batch_size / sec}


def measure_ensemble(n: int, args: argparse.Namespace, root: str) -> dict[str, float | str]:
    """``n`` runs of the method as ONE vectorised ensemble (spectra.train.fit_ensemble):
    seconds per epoch of all ``n`` together."""
    cfg = config(args, root, args.concurrent_mode, args.channels_last)
    with tempfile.TemporaryDirectory() as out:
        ensemble = Ensemble([cfg] * n, [Path(out) / str(i) for i in range(n)], log=print)
        ensemble.prepare()
        times = []
        for epoch in (1, 2, 3):  # epoch 1: warm-up (capture)
            t0 = time.perf_counter()
            ensemble.train_epoch(epoch, max_steps=args.steps)  # reads the loss once: synchronises
            steps = ensemble.batches.steps if args.steps is None else min(args.steps, ensemble.batches.steps)
            times.append((time.perf_counter() - t0) * ensemble.batches.steps / steps)
        used = "eager (capture failed)" if ensemble._graph_failed else ensemble.compile_mode
    sec = float(np.median(times[1:]))
    return {"mode": used, "s_per_epoch_all": sec, "img_per_s_all": n * ensemble.batches.steps * args.batch_size / sec}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-root", default=None, help="folder with cifar-10-batches-py (default: synthetic data)")
    parser.add_argument("--method", default="ce-drw-sam", choices=METHODS)
    parser.add_argument("--modes", default=None, help="comma list of off,graphs,inductor,max (default: off,graphs on CUDA; off on CPU)")
    parser.add_argument("--epochs", type=positive(int), default=2, help="timed epochs per mode (median reported)")
    parser.add_argument("--steps", type=positive(int), default=None, help="time only the first N steps of each epoch (CPU)")
    parser.add_argument("--batch-size", type=positive(int), default=128)
    parser.add_argument("--amp", default="off", choices=["off", "bf16"])
    parser.add_argument("--channels-last", dest="channels_last", action="store_true", default=None,
                        help="NHWC only (default: NCHW and NHWC on a CPU, the trainer's default on CUDA)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="NCHW only")
    parser.add_argument("--concurrent", type=non_negative(int), default=0, help="also time N runs in lockstep on N CUDA streams (fit_many)")
    parser.add_argument("--concurrent-mode", default="auto", help="--compile mode of the concurrent runs and the ensemble")
    parser.add_argument("--ensemble", type=non_negative(int), default=0, help="also time N runs as one vectorised ensemble (fit_ensemble)")
    parser.add_argument("--arch", default="resnet32", help="architecture (resnet8: quick CPU comparisons)")
    parser.add_argument("--max-train-samples", type=positive(int), default=None, help="train on the first N images (quick CPU comparisons)")
    args = parser.parse_args()
    if args.device == "cpu" and args.steps is None:
        args.steps = 5
    modes = args.modes.split(",") if args.modes else (["off", "graphs"] if args.device.startswith("cuda") else ["off"])
    unknown = [m for m in modes if m not in COMPILE_MODES]
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; expected some of {', '.join(COMPILE_MODES)}")
    try:
        report(args, modes)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        raise SystemExit(f"train_speed.py: error: {str(exc).splitlines()[0]}") from None


def report(args: argparse.Namespace, modes: list[str]) -> None:
    """Print the speed of each mode (and of concurrent runs / an ensemble when asked)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_root
        if root is None:
            write_synthetic_cifar10(Path(tmp))
            root = tmp
        name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
        n = sum(lt_class_counts(10, 5000, 100))
        print(f"# {args.method}, {args.arch}, CIFAR-10-LT ({min(n, args.max_train_samples or n)} images), batch {args.batch_size}, amp {args.amp}, {name}")
        print(f"{'mode, memory format':<30} {'s/epoch':>9} {'img/s':>9} {'warm-up s':>10}")
        layouts = [args.channels_last] if args.channels_last is not None or args.device != "cpu" else [False, True]
        for mode in modes:
            for channels_last in layouts:
                r = measure(mode, args, root, channels_last)
                print(f"{r['mode']:<30} {r['s_per_epoch']:>9.3f} {r['img_per_s']:>9.0f} {r['warmup_s']:>10.1f}", flush=True)
        if args.concurrent:
            r = measure_concurrent(args.concurrent, args, root)
            print(f"{args.concurrent} concurrent runs ({args.concurrent_mode}): {r['s_per_epoch_all']:.3f} s per epoch of all runs, "
                  f"{r['img_per_s_all']:.0f} img/s in total", flush=True)
        if args.ensemble:
            r = measure_ensemble(args.ensemble, args, root)
            print(f"ensemble of {args.ensemble} runs ({r['mode']}): {r['s_per_epoch_all']:.3f} s per epoch of all runs, "
                  f"{r['img_per_s_all']:.0f} img/s in total", flush=True)


if __name__ == "__main__":
    main()
