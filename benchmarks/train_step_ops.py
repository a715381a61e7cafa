"""Operations per training step (≈ GPU kernels) and eager seconds per step, per preset.

A ResNet-32 step on a GPU is a chain of small kernels, so their count bounds its
time even inside a CUDA graph. This counts the top-level ATen operations of one
eager step with the PyTorch profiler, times the following steps, and prints a
checksum of the weights (to check that a change leaves training bit-identical).

    python benchmarks/train_step_ops.py --data-root DIR --methods ce,ce-drw-sam [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from spectra.train import resolve_config
from spectra.train.trainer import Trainer


def top_level_ops(prof) -> int:
    """ATen operations not called from inside another ATen operation."""
    return sum(1 for e in prof.events()
               if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def measure(method: str, args: argparse.Namespace) -> dict:
    cfg = resolve_config(method, data_root=args.data_root, epochs=1, progress=False, device=args.device,
                         max_train_samples=args.max_train_samples, max_test_samples=100, compile="off")
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, out, log=lambda m: None)
        trainer.begin()
        steps = trainer.start_train_epoch(1, args.steps + 3)
        trainer.train_step(0)
        trainer.train_step(1)
        sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
        sync()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.train_step(2)
            sync()
        times = []
        for i in range(3, steps):
            t0 = time.perf_counter()
            trainer.train_step(i)
            sync()
            times.append(time.perf_counter() - t0)
        weights = torch.cat([p.detach().reshape(-1) for p in trainer.params]).double().sum().item()
    return {"method": method, "ops_per_step": top_level_ops(prof), "median_step_s": statistics.median(times),
            "weights_checksum": weights}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="CIFAR-10 in the standard python format")
    p.add_argument("--methods", default="ce,ce-drw-sam,ce-drw-pgd,ce-drw-lpf")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=15, help="timed steps (after 3 untimed)")
    p.add_argument("--max-train-samples", type=int, default=2600)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# resnet32, CIFAR-10-LT, batch 128, eager, {args.device}, torch {torch.__version__}")
    for method in args.methods.split(","):
        r = measure(method.strip(), args)
        print(f"{r['method']:14s} ops/step {r['ops_per_step']:5d}  median step {r['median_step_s'] * 1e3:8.1f} ms  "
              f"weights checksum {r['weights_checksum']:.12e}", flush=True)


if __name__ == "__main__":
    main()
