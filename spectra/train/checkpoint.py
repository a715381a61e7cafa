"""The self-describing checkpoint format and atomic file writing.

A checkpoint is ``torch.save`` of a dict loadable with
``torch.load(path, weights_only=True)`` (tensors, dicts, lists, str, int,
float, bool, None only)::

    {"format": "spectra-checkpoint", "format_version": 1,
     "arch": "resnet32", "arch_kwargs": {"num_classes": 10, "cosine_head": False},
     "num_classes": 10, "class_names": [...],
     "dataset": DatasetSpec.to_dict(), "class_counts": [...],
     "data_sha256": {"train": ..., "test": ...} (pixels and labels; absent before 2026-11-29),
     "method": "ce-drw-sam", "config": TrainConfig.to_dict(),
     "epoch": completed epochs (1-indexed), "state_dict": model.state_dict(),
     "optimizer": optimizer.state_dict(), "rng": {...}, "train_state": {...},
     "metrics": last evaluation, "spectra_version": "..."}

``spectra.models.build_model(ckpt["arch"], **ckpt["arch_kwargs"])`` followed by
``load_state_dict(ckpt["state_dict"])`` rebuilds the network.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models import build_model

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_torch_save",
    "load_training_checkpoint",
    "model_from_checkpoint",
    "checkpoint_name",
]

CHECKPOINT_FORMAT = "spectra-checkpoint"
CHECKPOINT_VERSION = 1


def checkpoint_name(epoch: int) -> str:
    return f"ckpt_epoch{epoch:04d}.pt"


def _umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic(path: Path, write: Any) -> None:
    """Write ``path`` through a temporary file beside it and a rename; the file
    gets the permissions ``open()`` would give it (0666 less the umask), not
    mkstemp's owner-only 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            # No fsync: os.replace keeps readers from ever seeing a partial file
            # after a crash of this process, and per-epoch fsyncs cost seconds.
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename over it."""
    _atomic(Path(path), lambda fh: fh.write(data))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_torch_save(path: str | os.PathLike[str], obj: Any) -> None:
    _atomic(Path(path), lambda fh: torch.save(obj, fh))


def load_training_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a spectra checkpoint (``weights_only=True``).

    A file torch cannot read (truncated, corrupt, not a checkpoint at all)
    raises ``ValueError`` naming it; a missing or unreadable file raises the
    ``OSError`` of opening it.
    """
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception:  # UnpicklingError, a zip reader's RuntimeError, EOFError, ...: torch's text
        # may advise weights_only=False, which would run arbitrary code from the file.
        raise ValueError(f"{path} is not a readable spectra training checkpoint (corrupt?)") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a spectra training checkpoint")
    if int(ckpt.get("format_version", 0)) > CHECKPOINT_VERSION:
        raise ValueError(f"{path} has checkpoint format version {ckpt['format_version']}; this spectra reads <= {CHECKPOINT_VERSION}")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    """Rebuild the network of a loaded checkpoint, weights loaded, in eval mode."""
    model = build_model(ckpt["arch"], **ckpt.get("arch_kwargs", {}))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
