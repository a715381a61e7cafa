"""Tiny checkpoints on synthetic data, shared by the analysis, sweep and CLI tests.

A synthetic CIFAR-10 folder in the standard pickle format, a tiny importable
CNN, and spectra-format checkpoints of a short training run of it (like
tests/problems.py, a shared table rather than tests).
"""
from __future__ import annotations

import pickle
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from spectra.datasets import CIFAR10_CLASSES, DatasetSpec, load_dataset, normalize

TINY_MODULE = "spectra_test_tiny"
TINY_SOURCE = textwrap.dedent('''
    import torch.nn as nn

    class TinyNet(nn.Module):
        """conv(3→4, stride 2) → BN → ReLU → pool 4×4 → linear: ~800 parameters."""

        def __init__(self, num_classes=10):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.pool = nn.AdaptiveAvgPool2d(4)
            self.linear = nn.Linear(64, num_classes)

        def forward(self, x):
            return self.linear(self.pool(self.bn(self.conv(x)).relu()).flatten(1))
''')
TINY_ARCH = f"{TINY_MODULE}:TinyNet"


def install_tiny_module(folder: Path) -> Path:
    """Write the tiny architecture's module into ``folder`` and make it importable."""
    (folder / f"{TINY_MODULE}.py").write_text(TINY_SOURCE)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return folder


def write_cifar10(root: Path, per_class: int = 6, test_per_class: int = 3, seed: int = 0) -> Path:
    """A synthetic CIFAR-10 in the standard ``cifar-10-batches-py`` pickle format.

    Images of class c are noise around a class-specific colour, so a model can
    learn them. Training labels are interleaved over five batches.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def images(labels: np.ndarray) -> np.ndarray:
        base = (labels[:, None] * 23 % 256).astype(np.float64)
        noise = rng.normal(0, 40, size=(len(labels), 3072))
        channel_shift = np.repeat(np.array([30.0, -20.0, 10.0]), 1024)[None, :] * (labels[:, None] % 3 - 1)
        return np.clip(base + 60 + noise + channel_shift, 0, 255).astype(np.uint8)

    train_labels = np.tile(np.arange(10), per_class)
    rng.shuffle(train_labels)
    data = images(train_labels)
    for i, part in enumerate(np.array_split(np.arange(len(train_labels)), 5), start=1):
        with open(folder / f"data_batch_{i}", "wb") as fh:
            pickle.dump({"data": data[part], "labels": train_labels[part].tolist()}, fh)
    test_labels = np.repeat(np.arange(10), test_per_class)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({"data": images(test_labels), "labels": test_labels.tolist()}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": list(CIFAR10_CLASSES)}, fh)
    return root


def copy_with_one_pixel_changed(root: Path, to: Path, class_index: int = 0, batch_file: str = "data_batch_1") -> Path:
    """A copy of the synthetic CIFAR-10 at ``root`` whose first image of ``class_index``
    in ``batch_file`` (``test_batch``: the test split) has one pixel value changed (a
    re-encoded copy in miniature)."""
    shutil.copytree(root, to)
    batch = to / "cifar-10-batches-py" / batch_file
    with open(batch, "rb") as fh:
        content = pickle.load(fh)
    first = content["labels"].index(class_index)
    content["data"][first, 0] ^= 1
    with open(batch, "wb") as fh:
        pickle.dump(content, fh)
    return to


def spectra_checkpoint(model: torch.nn.Module, epoch: int, dataset: dict, method: str = "ce") -> dict:
    """A checkpoint in spectra's training format (weights_only-safe)."""
    return {
        "format": "spectra-checkpoint", "format_version": 1, "arch": TINY_ARCH,
        "arch_kwargs": {"num_classes": 10}, "num_classes": 10, "class_names": list(CIFAR10_CLASSES),
        "dataset": dataset, "class_counts": None, "method": method, "config": {}, "epoch": epoch,
        "state_dict": model.state_dict(), "optimizer": {}, "rng": {"torch": torch.get_rng_state()},
        "metrics": {}, "spectra_version": "0.1.0",
    }


def make_run(run_dir: Path, data_root: Path, epochs=(1, 2, 3), dataset: str = "cifar10",
             method: str = "ce", seed: int = 0) -> list[Path]:
    """Train the tiny net for a few epochs, saving ckpt_epoch{E:04d}.pt and last.pt."""
    sys.modules.pop(TINY_MODULE, None)
    tiny = __import__(TINY_MODULE)
    torch.manual_seed(seed)
    model = tiny.TinyNet(10)
    spec = DatasetSpec(dataset, root=str(data_root))
    data = load_dataset(spec)
    x, y = normalize(data.images), data.labels
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for epoch in range(1, max(epochs) + 1):
        model.train()
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        if epoch in epochs:
            ckpt = spectra_checkpoint(model, epoch, spec.to_dict(), method)
            paths.append(run_dir / f"ckpt_epoch{epoch:04d}.pt")
            torch.save(ckpt, paths[-1])
            torch.save(ckpt, run_dir / "last.pt")
    return paths




def tiny_run(base: Path) -> dict:
    """A data root, the tiny module and a 3-checkpoint CE run under ``base``:
    ``{"base", "root", "run": [ckpt_epoch0001.pt, ..0002, ..0003]}``."""
    install_tiny_module(base)
    data_root = write_cifar10(base / "data")
    run = make_run(base / "run-ce", data_root)
    return {"base": base, "root": data_root, "run": run}
