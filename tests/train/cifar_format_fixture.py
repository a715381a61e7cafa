"""Writers of small synthetic data sets in the standard CIFAR python format.

``write_cifar10(root, ...)`` creates ``root/cifar-10-batches-py`` (data_batch_1..5,
test_batch, batches.meta); ``write_cifar100(root, ...)`` creates
``root/cifar-100-python`` (train, test, meta). Images are random uint8 with a
class-dependent mean so that a model can learn something. ``bytes_keys``
writes the keys as bytes, as the official files have them.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def synthetic_images(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """(N, 3072) uint8 rows (R, G, B planes), brighter for higher classes."""
    base = (labels.astype(np.float64) / max(num_classes - 1, 1) * 160.0)[:, None]
    return np.clip(base + rng.integers(0, 96, size=(len(labels), 3072)), 0, 255).astype(np.uint8)


def _labels(per_class: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    labels = np.repeat(np.arange(num_classes), per_class)
    rng.shuffle(labels)
    return labels


def _key(name: str, bytes_keys: bool) -> str | bytes:
    return name.encode() if bytes_keys else name


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def write_cifar10(root: str | Path, train_per_class: int = 20, test_per_class: int = 5, seed: int = 0, bytes_keys: bool = False) -> Path:
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = _labels(train_per_class, 10, rng)
    data = synthetic_images(labels, 10, rng)
    for i, part in enumerate(np.array_split(np.arange(len(labels)), 5), start=1):
        _dump(folder / f"data_batch_{i}", {_key("data", bytes_keys): data[part], _key("labels", bytes_keys): labels[part].tolist()})
    test_labels = _labels(test_per_class, 10, rng)
    _dump(folder / "test_batch", {_key("data", bytes_keys): synthetic_images(test_labels, 10, rng), _key("labels", bytes_keys): test_labels.tolist()})
    names = [n.encode() for n in CIFAR10_NAMES] if bytes_keys else CIFAR10_NAMES
    _dump(folder / "batches.meta", {_key("label_names", bytes_keys): names})
    return folder


def write_cifar100(root: str | Path, train_per_class: int = 10, test_per_class: int = 2, seed: int = 0, bytes_keys: bool = False) -> Path:
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = _labels(per_class, 100, rng)
        _dump(folder / split, {
            _key("data", bytes_keys): synthetic_images(labels, 100, rng),
            _key("fine_labels", bytes_keys): labels.tolist(),
            _key("coarse_labels", bytes_keys): (labels // 5).tolist(),
        })
    names = [f"class{c:02d}" for c in range(100)]
    _dump(folder / "meta", {
        _key("fine_label_names", bytes_keys): [n.encode() for n in names] if bytes_keys else names,
        _key("coarse_label_names", bytes_keys): [f"super{c}" for c in range(20)],
    })
    return folder
