"""λmax and λmin of one class's Hessian measured the paper's way, beside spectra's.

The paper's code (a copy of PyHessian) summed Hessian-vector products over
batches of 128 of the class's training images with the training augmentation
left on (random crop 32 from the image zero-padded by 4, horizontal flip), so
every product saw other crops of the images: the operator changed between
products. Model in eval mode, plain mean cross-entropy; λmax and λmin were the
largest and smallest Ritz values of one 100-step Lanczos run, with no residual
check. spectra uses the same images without augmentation (one fixed matrix)
and Lanczos to a residual tolerance.

Per checkpoint and class this prints, and writes with ``--json``:

* ``exact``: :func:`spectra.eigenvalues` on the fixed operator (``--tol``), with residuals;
* ``ritz_fixed``: Ritz extremes of one ``--steps``-step Lanczos run on the fixed
  operator (a check: they agree with ``exact`` when the run has converged; null with
  ``--no-fixed-check``, which saves about 40 % of the time);
* ``ritz_augmented``: the same on the augmented operator, once per ``--repeats`` seed:
  the paper's numbers.

    python benchmarks/paper_protocol.py runs/ce-drw/ckpt_epoch0200.pt --classes 0,9 --data-root DIR \\
        --max-samples 100 --json paper_protocol.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import positive  # noqa: E402
import spectra  # noqa: E402
from spectra import datasets as ds  # noqa: E402
from spectra.class_data import DataCache, DataOptions  # noqa: E402
from spectra.lanczos import lanczos_tridiagonal, random_probes  # noqa: E402
from spectra.train.augment import PAD, crop_and_flip  # noqa: E402


class AugmentedClass:
    """Batches of one class's images, re-augmented on every pass (as a training loader would).

    ``images``: uint8 NHWC. Each pass draws new crops and flips from ``generator``,
    so a Hessian operator that reads the data anew for every product (``cache_data=False``)
    multiplies each vector by a different matrix.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator) -> None:
        self.padded = torch.nn.functional.pad(images.permute(0, 3, 1, 2), (PAD, PAD, PAD, PAD))  # pixel 0, as RandomCrop
        self.labels = labels
        self.batch_size = batch_size
        self.generator = generator

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        dx, dy = (torch.randint(0, 2 * PAD + 1, (n,), generator=self.generator) for _ in range(2))
        flip = torch.randint(0, 2, (n,), generator=self.generator)
        crops = crop_and_flip(self.padded, torch.arange(n), dx, dy, flip)  # uint8 NCHW
        inputs = ds.normalize(crops.permute(0, 2, 3, 1))
        for start in range(0, n, self.batch_size):
            yield inputs[start:start + self.batch_size], self.labels[start:start + self.batch_size]


def ritz_extremes(H: spectra.HessianOperator, steps: int, seed: int) -> tuple[float, float]:
    """(λmin, λmax) as the smallest and largest Ritz values of one ``steps``-step Lanczos run."""
    start = random_probes(H.shape[0], 1, seed, kind="gaussian")
    ritz = np.linalg.eigvalsh(lanczos_tridiagonal(H.matmul, start, steps).matrix(0))
    return float(ritz[0]), float(ritz[-1])


class ClassImages:
    """Each class's analysed training images as uint8 NHWC, for re-augmenting: the samples
    ``spectra eigs --max-samples`` analyses (:meth:`DataCache.class_positions` chooses them)."""

    def __init__(self, data_root: str, max_samples: int | None) -> None:
        self.cache = DataCache(DataOptions(root=data_root, max_samples=max_samples), rank=0, world=1)

    def __call__(self, checkpoint: spectra.LoadedCheckpoint, class_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if checkpoint.dataset is None:
            raise SystemExit(f"error: {checkpoint.path} does not record its data set (train it with spectra train)")
        try:
            positions = self.cache.class_positions(checkpoint, class_index)
        except (OSError, ValueError) as exc:  # AnalysisError is a ValueError
            raise SystemExit(f"error: {checkpoint.path.name}: {exc}") from None
        source = self.cache.source(checkpoint)
        return source.pixels[positions], source.labels[positions]


def measure(checkpoint: spectra.LoadedCheckpoint, images: torch.Tensor, labels: torch.Tensor,
            args: argparse.Namespace) -> dict[str, Any]:
    """The three measurements of one (checkpoint, class)."""
    loss = torch.nn.CrossEntropyLoss()
    model = checkpoint.model
    fixed = spectra.HessianOperator(model, loss, (ds.normalize(images), labels), batch_size=args.batch_size)
    t0 = time.perf_counter()
    exact = spectra.eigenvalues(fixed, k=1, which="both", tol=args.tol, max_iter=args.max_iter)
    row: dict[str, Any] = {
        "images": len(labels), "exact": {"lambda_max": float(exact.top[0]), "lambda_min": float(exact.bottom[0]),
                                         "residual_max": float(exact.top_residuals[0]),
                                         "residual_min": float(exact.bottom_residuals[0]),
                                         "products": int(exact.num_matvecs), "seconds": time.perf_counter() - t0}}
    row["ritz_fixed"] = None
    if args.fixed_check:
        t0 = time.perf_counter()
        lmin, lmax = ritz_extremes(fixed, args.steps, seed=0)
        row["ritz_fixed"] = {"lambda_max": lmax, "lambda_min": lmin, "seconds": time.perf_counter() - t0}
    row["ritz_augmented"] = []
    for seed in range(args.repeats):
        passes = AugmentedClass(images, labels, 128, torch.Generator().manual_seed(seed))
        augmented = spectra.HessianOperator(model, loss, passes, cache_data=False)
        t0 = time.perf_counter()
        lmin, lmax = ritz_extremes(augmented, args.steps, seed=seed)
        row["ritz_augmented"].append({"seed": seed, "lambda_max": lmax, "lambda_min": lmin,
                                      "seconds": time.perf_counter() - t0})
    return row


def ratio(entry: dict[str, float]) -> float:
    """|λmin/λmax| of one measurement (an ``exact``, ``ritz_fixed`` or ``ritz_augmented`` entry)."""
    return abs(entry["lambda_min"] / entry["lambda_max"])


def print_row(name: str, class_index: int, row: dict[str, Any]) -> None:
    e, f = row["exact"], row["ritz_fixed"]
    print(f"{name} class {class_index} ({row['images']} images)")
    print(f"  exact (tol, {e['products']} products): λmax {e['lambda_max']:.3f}  λmin {e['lambda_min']:.4f}  "
          f"ratio {ratio(e):.4f}")
    if f is not None:
        print(f"  Ritz, fixed operator      : λmax {f['lambda_max']:.3f}  λmin {f['lambda_min']:.4f}  "
              f"ratio {ratio(f):.4f}")
    for a in row["ritz_augmented"]:
        print(f"  Ritz, augmented (seed {a['seed']})  : λmax {a['lambda_max']:.3f}  λmin {a['lambda_min']:.4f}  "
              f"ratio {ratio(a):.4f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, help="checkpoints written by spectra train")
    parser.add_argument("--classes", required=True, help="comma-separated class indices, e.g. 0,9")
    parser.add_argument("--data-root", required=True, help="folder with cifar-10-batches-py")
    parser.add_argument("--max-samples", type=positive(int), default=100, help="images per class (default 100)")
    parser.add_argument("--steps", type=positive(int), default=100, help="Lanczos steps of the Ritz runs (paper: 100)")
    parser.add_argument("--repeats", type=positive(int), default=2, help="augmented runs per class (default 2)")
    parser.add_argument("--tol", type=float, default=1e-4, help="residual tolerance of the exact values")
    parser.add_argument("--max-iter", type=positive(int), default=100)
    parser.add_argument("--batch-size", type=positive(int), default=1000, help="batch of the fixed operator")
    parser.add_argument("--no-fixed-check", dest="fixed_check", action="store_false",
                        help="skip the Ritz run on the fixed operator (a check of the exact values)")
    parser.add_argument("--json", type=Path, default=None, help="write the measurements here")
    args = parser.parse_args(argv)
    try:
        classes = [int(c) for c in args.classes.split(",")]
    except ValueError:
        raise SystemExit(f"error: --classes must be comma-separated integers, got {args.classes!r}") from None
    results: dict[str, Any] = {"device": "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
                               "settings": {k: v for k, v in vars(args).items() if k not in ("checkpoints", "json")},
                               "entries": []}
    class_images = ClassImages(args.data_root, args.max_samples)
    for path in args.checkpoints:
        try:
            checkpoint = spectra.load_checkpoint(path)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"error: {path}: {exc}") from None
        name = f"{path.parent.name}/{path.name}"
        for c in classes:
            images, labels = class_images(checkpoint, c)
            row = measure(checkpoint, images, labels, args)
            print_row(name, c, row)
            results["entries"].append({"checkpoint": str(path), "run": path.parent.name, "epoch": checkpoint.epoch,
                                       "class": c, **row})
            if args.json is not None:  # after every entry: a long run that is stopped keeps what it measured
                args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
