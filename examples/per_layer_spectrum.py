"""Per-layer Hessian spectrum of a checkpoint: λmax and λmin of the per-class
Hessian restricted to each block of the network, beside the whole network's.

For a block B (its parameters θ_B, every other parameter held fixed) the
restricted Hessian is the diagonal block

    H_c[B, B] = ∇²_{θ_B} (1/N_c) Σ_{i: y_i = c} CE(f_θ(x_i), y_i),

so by Cauchy interlacing λmin(H_c) ≤ λmin(H_c[B, B]) and λmax(H_c[B, B]) ≤ λmax(H_c):
a block's extremes bound the network's from inside, and show where the
curvature (and the negative curvature of a saddle) lives.

    python examples/per_layer_spectrum.py CKPT --class 9 [--data-root DIR] [--out per_layer]
    python examples/per_layer_spectrum.py --class 9        # no checkpoint: trains a ResNet-8 on the shipped sample first

Results go to ``OUT/per_layer.h5`` (spectra's schema, one entry per block,
its pattern in the ``params`` attribute) and ``OUT/per_layer.png``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from spectra import store
from spectra.analysis import AnalysisSettings, analyse_checkpoint
from spectra.checkpoints import load_checkpoint
from spectra.class_data import DataOptions


def train_small_checkpoint(out: Path, epochs: int) -> tuple[Path, Path]:
    """A ResNet-8 trained with CE+DRW on the shipped CIFAR-10 sample; (checkpoint, data root)."""
    from spectra.demo import DEMO_ARCH, load_sample, write_cifar_batches
    from spectra.train import fit, resolve_config

    data_root = out / "data"
    write_cifar_batches(load_sample(), data_root)
    config = resolve_config("ce-drw", "cifar10", data_root=str(data_root), arch=DEMO_ARCH, epochs=epochs,
                            batch_size=64, warmup_epochs=1, drw_epoch=max(1, epochs // 2), device="cpu",
                            progress=False)
    run = out / "runs" / "ce-drw"
    fit(config, run, resume=(run / "last.pt").is_file())
    return run / f"ckpt_epoch{epochs:04d}.pt", data_root


def parameter_blocks(checkpoint: Path) -> list[str]:
    """One fnmatch pattern per top-level module that holds parameters (conv1, bn1, layer1, …, linear)."""
    model = load_checkpoint(checkpoint).model
    tops = dict.fromkeys(name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad)
    return [f"{top}.*" for top in tops]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", type=Path, help="Checkpoint file (default: train a small one).")
    parser.add_argument("--class", dest="class_spec", default="9", help="Class index or name.")
    parser.add_argument("--data-root", default=None, help="Folder with cifar-10-batches-py (default: as recorded).")
    parser.add_argument("--max-samples", type=int, default=24, help="Samples of the class in its Hessian.")
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--epochs", type=int, default=4, help="Epochs of the small model trained without CKPT.")
    parser.add_argument("--out", type=Path, default=Path("per_layer"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # small products: a second OpenMP thread mostly waits (and thrashes on busy cores)

    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint, data_root = args.checkpoint, args.data_root
    if checkpoint is None:
        checkpoint, root = train_small_checkpoint(args.out, args.epochs)
        data_root = str(root)
    data = DataOptions(root=data_root, max_samples=args.max_samples, device="cpu")
    results = args.out / "per_layer.h5"

    rows = []
    with store.ResultsWriter(results) as writer:
        for pattern in [None, *parameter_blocks(checkpoint)]:
            settings = AnalysisSettings(kind="eigs", tol=args.tol, max_iter=100,
                                        params=None if pattern is None else (pattern,))
            (record,) = analyse_checkpoint(checkpoint, args.class_spec, settings, data)
            writer.write(record)
            p = record.provenance
            lam_max, lam_min = float(record.arrays["top"][0]), float(record.arrays["bottom"][0])
            rows.append((pattern or "whole network", int(p["num_params"]), lam_max, lam_min, p["num_matvecs"]))
    p = record.provenance
    print(f"{checkpoint}: class {p['class_index']} ({p['class_name']}), {p['num_samples']} samples, "
          f"epoch {p['epoch']}")
    print(f"{'block':<14} {'params':>8} {'λmax':>10} {'λmin':>10} {'|λmin/λmax|':>12} {'HVPs':>5}")
    for name, n, lam_max, lam_min, hvps in rows:
        print(f"{name:<14} {n:>8} {lam_max:>10.4g} {lam_min:>10.4g} {abs(lam_min / lam_max):>12.3g} {hvps:>5}")

    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.8), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r[2] for r in rows], 0.4, label="λmax", color="darkorange")
    ax.bar(x + 0.2, [abs(r[3]) for r in rows], 0.4, label="|λmin|", color="crimson")
    ax.set_yscale("log")
    ax.set_xticks(x, [r[0] for r in rows], rotation=20)
    ax.set_ylabel("eigenvalue magnitude")
    ax.set_title(f"Per-block Hessian extremes, class {p['class_index']} ({p['class_name']}), epoch {p['epoch']}")
    ax.legend()
    fig.savefig(args.out / "per_layer.png", dpi=100)
    print(f"wrote {results} and {args.out / 'per_layer.png'} (params of each entry: "
          f"{json.dumps([r[0] for r in rows])})")


if __name__ == "__main__":
    main()
