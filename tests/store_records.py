"""Results-store entries for tests: one made-up record per (epoch, class, run)."""
from __future__ import annotations

import hashlib

import numpy as np

from spectra.store import ResultRecord


def make_record(epoch: int, cls: int, lam_max: float, lam_min: float, *, run: str = "run-a",
                kind: str = "eigs", settings: str = "s" * 64, parent: str = "/x") -> ResultRecord:
    """An entry of checkpoint ``{parent}/{run}/ckpt_epoch{epoch}.pt``; NaN λ means an empty end (k = 0)."""
    prov = {
        "kind": kind, "settings_hash": settings, "checkpoint_path": f"{parent}/{run}/ckpt_epoch{epoch:04d}.pt",
        "checkpoint_sha256": hashlib.sha256(f"{parent}/{run}/{epoch}".encode()).hexdigest(), "checkpoint_format": "spectra",
        "epoch": epoch, "run": run, "method": "ce", "model": "resnet20",
        "model_kwargs": {"num_classes": 3, "cosine_head": False}, "dataset": {"name": "cifar10"},
        "split": "train", "class_index": cls, "class_name": f"c{cls}", "num_samples": 10 - cls,
        "sample_indices_sha256": "0" * 64, "class_counts": [10, 9, 8], "loss_fn": "ce", "loss": 1.5,
        "algorithm": "lanczos", "algorithm_params": {"k": 1}, "params": None, "num_params": 100,
        "seed": 0, "dtype": "float32", "device": "cpu", "num_matvecs": 12, "wall_time_s": 0.1,
    }
    if kind == "eigs":
        top = np.array([] if np.isnan(lam_max) else [lam_max])
        bottom = np.array([] if np.isnan(lam_min) else [lam_min])
        arrays = {"top": top, "bottom": bottom,
                  "top_residuals": np.full(top.shape, 1e-7), "bottom_residuals": np.full(bottom.shape, 2e-7)}
    else:
        grid = np.linspace(lam_min, lam_max, 50)
        arrays = {"nodes": np.ones((2, 3)), "weights": np.full((2, 3), 1 / 3), "grid": grid,
                  "values": np.exp(-grid ** 2)}
    return ResultRecord(provenance=prov, arrays=arrays)
