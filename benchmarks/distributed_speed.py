"""Speed of sharded Hessian products: 1 process vs 2 gloo processes on the CPU.

    python benchmarks/distributed_speed.py --images 256 --out bench_distributed.json

A small CIFAR ResNet (``CifarResNet((1, 1, 1))``, 8 layers) and ``--images``
random 32×32 images of one class. Three layouts of the same cores:

- ``1 proc × 1 thread``  — the baseline one rank;
- ``1 proc × W threads`` — what one process gets from intra-op threads;
- ``W procs × 1 thread`` — spectra under torch.distributed (gloo, loopback),
  each rank holding ``images / W`` samples, products all-reduced.

For each: the median time of one HVP (single vector) and the wall time of
λmax+λmin (``eigenvalues(which="both", tol=1e-4)``, same seed, so the same
number of products), with the eigenvalues, which must agree across layouts.
Every layout runs in fresh processes started by ``torch.multiprocessing.spawn``.
The machine is recorded beside the numbers; on a shared box they are rough.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import spectra  # noqa: E402
from spectra import distributed as sd  # noqa: E402
from spectra.models import CifarResNet  # noqa: E402


def class_data(images: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(images, 3, 32, 32, generator=gen), torch.zeros(images, dtype=torch.long)


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return CifarResNet((1, 1, 1), num_classes=10).eval()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Time products and λmax+λmin on this rank's shard (all ranks run the same calls)."""
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    H = spectra.HessianOperator(build_model(), nn.CrossEntropyLoss(), sd.shard(class_data(args.images)),
                                dtype=dtype, batch_size=args.batch_size)
    v = torch.randn(H.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    H @ v  # warm-up (first vmap trace)
    times = []
    for _ in range(args.repeats):
        sd.barrier()
        start = time.perf_counter()
        H @ v
        times.append(time.perf_counter() - start)
    sd.barrier()
    start = time.perf_counter()
    res = spectra.eigenvalues(H, k=1, which="both", tol=1e-4, max_iter=args.max_iter, seed=0)
    eig_s = time.perf_counter() - start
    return {"hvp_s": statistics.median(times), "eigs_s": eig_s, "lambda_max": res.lambda_max,
            "lambda_min": res.lambda_min, "num_matvecs": res.num_matvecs, "converged": res.converged,
            "num_params": H.dim, "samples_per_rank": sum(len(b[1]) for b in H.batches())}


def _worker(rank: int, world: int, threads: int, port: int, out: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(threads)
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with sd.distributed_session(device="cpu") as ctx:
        result = measure(args)
        if ctx.is_writer:
            Path(out).write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(world: int, threads: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.spawn(_worker, args=(world, threads, _free_port(), out, args), nprocs=world, join=True)
        return {"processes": world, "threads_per_process": threads, **json.loads(Path(out).read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--world", type=int, default=2, help="processes in the distributed layout")
    parser.add_argument("--repeats", type=int, default=5, help="timed single-vector HVPs (median reported)")
    parser.add_argument("--max-iter", type=int, default=60)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    layouts = [(1, 1), (1, args.world), (args.world, 1)]
    rows = [run_layout(world, threads, args) for world, threads in layouts]
    base, threaded, sharded = rows
    report = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "load_average_1min": os.getloadavg()[0]},
        "settings": vars(args) | {"out": str(args.out) if args.out else None},
        "layouts": rows,
        "speedup_hvp_vs_1x1": base["hvp_s"] / sharded["hvp_s"],
        "speedup_eigs_vs_1x1": base["eigs_s"] / sharded["eigs_s"],
        "speedup_hvp_vs_threads": threaded["hvp_s"] / sharded["hvp_s"],
        "speedup_eigs_vs_threads": threaded["eigs_s"] / sharded["eigs_s"],
        "max_relative_difference_lambda": max(
            abs(r[key] - base[key]) / abs(base[key]) for r in rows for key in ("lambda_max", "lambda_min")),
    }
    for r in rows:
        print(f"{r['processes']} proc × {r['threads_per_process']} thread: HVP {r['hvp_s'] * 1e3:7.1f} ms, "
              f"λmax+λmin {r['eigs_s']:6.2f} s ({r['num_matvecs']} products), "
              f"λmax {r['lambda_max']:.6g}, λmin {r['lambda_min']:.6g}")
    print(f"speed-up of {args.world} gloo processes: HVP ×{report['speedup_hvp_vs_1x1']:.2f}, "
          f"eigs ×{report['speedup_eigs_vs_1x1']:.2f} vs 1×1; HVP ×{report['speedup_hvp_vs_threads']:.2f}, "
          f"eigs ×{report['speedup_eigs_vs_threads']:.2f} vs 1 proc × {args.world} threads "
          f"(load average {report['machine']['load_average_1min']:.1f} on {os.cpu_count()} cores)")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
