"""Build ``data/cifar10_lt_sample.npz``: the small real CIFAR-10 sample of the demo.

Source: ``lossless_subset.npz`` — the exact original pixels of CIFAR-10
training images 0–3999 and test images 0–999 in the official order
(Krizhevsky 2009). Construction, deterministic (no random numbers):

* train: a long-tailed subset of training images 0–3999. Class ``c`` keeps
  ``n_c = int(N_MAX · (1/RATIO)^(c/9))`` images (N_MAX = 250, RATIO = 10:
  250, 193, 149, 116, 89, 69, 53, 41, 32, 25 = 1017 images), namely its
  first ``n_c`` images in the official order. Class 0 (airplane) is the
  head, class 9 (truck) the tail, as in CIFAR-10-LT.
* test: test images 0–499 (all ten classes, 40–57 each), official order.

The file stores the images (uint8, N×32×32×3, NHWC), labels (uint8), each
image's index into the official split (int64) and the class names.

Usage::

    python data/build_sample.py [--source ../shared/data/cifar10/lossless_subset.npz] [--out data/cifar10_lt_sample.npz]

Rebuilding gives a byte-identical array content (checked by the SHA-256 of
the arrays printed at the end and recorded in data/README.md).
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np

CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
N_MAX = 250
RATIO = 10.0
TEST_IMAGES = 500
DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "lossless_subset.npz"
DEFAULT_OUT = Path(__file__).resolve().parent / "cifar10_lt_sample.npz"


def long_tailed_counts(num_classes: int = 10, n_max: int = N_MAX, ratio: float = RATIO) -> list[int]:
    """``n_c = int(n_max · (1/ratio)^(c/(C−1)))`` (the CIFAR-LT exponential profile)."""
    return [int(n_max * (1.0 / ratio) ** (c / (num_classes - 1))) for c in range(num_classes)]


def first_per_class(labels: np.ndarray, counts: list[int]) -> np.ndarray:
    """Indices of the first ``counts[c]`` images of each class c, class-major,
    each class in the official order."""
    chosen = []
    for c, n_c in enumerate(counts):
        idx = np.flatnonzero(labels == c)
        if len(idx) < n_c:
            raise ValueError(f"class {c} has {len(idx)} images in the source, {n_c} wanted")
        chosen.append(idx[:n_c])
    return np.concatenate(chosen).astype(np.int64)


def arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over the arrays' names, dtypes, shapes and bytes (zip metadata excluded)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def build(source: Path) -> dict[str, np.ndarray]:
    raw = np.load(source)
    x_train, y_train = raw["x_train_0_3999"], raw["y_train_0_3999"]
    x_test, y_test = raw["x_test_0_999"], raw["y_test_0_999"]
    train_idx = first_per_class(y_train, long_tailed_counts())
    test_idx = np.arange(TEST_IMAGES, dtype=np.int64)
    return {
        "x_train": x_train[train_idx].astype(np.uint8),
        "y_train": y_train[train_idx].astype(np.uint8),
        "train_indices": train_idx,
        "x_test": x_test[test_idx].astype(np.uint8),
        "y_test": y_test[test_idx].astype(np.uint8),
        "test_indices": test_idx,
        "class_names": np.array(CLASS_NAMES),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    arrays = build(args.source)
    np.savez_compressed(args.out, **arrays)
    counts = np.bincount(arrays["y_train"], minlength=10).tolist()
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): train {len(arrays['y_train'])} images "
          f"{counts}, test {len(arrays['y_test'])} images {np.bincount(arrays['y_test'], minlength=10).tolist()}")
    print(f"arrays sha256 {arrays_sha256(arrays)}")


if __name__ == "__main__":
    main()
