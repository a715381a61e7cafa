"""Load any checkpoint people have into a model plus its metadata.

Supported inputs, tried in this order:

* **TorchScript archives** (``torch.jit.save``): loaded with ``torch.jit.load``.
* **spectra training checkpoints** (``format == "spectra-checkpoint"``): they
  name the architecture, its arguments, the data set and the class counts, so
  they load with no extra information.
* **reference-code checkpoints** (``{'epoch', 'arch', 'state_dict',
  'best_acc1', 'optimizer'}``, keys prefixed ``module.``): the architecture
  name comes from ``arch``; for built-in CIFAR ResNets the number of classes
  and the head type (linear or cosine) are read off the weights.
* **plain state dicts**, bare or wrapped in a dict under ``state_dict``,
  ``model_state_dict``, ``model`` or ``net``; the architecture must be given
  (``arch=`` / ``--arch``).

Every file is read with ``torch.load(weights_only=True)``: only tensors,
containers and primitive values are unpickled, so loading cannot run code.
A checkpoint that needs full unpickling (a pickled ``nn.Module``) is refused
with :class:`UntrustedCheckpointError` unless ``trust=True``
(``--trust-checkpoint``), because unpickling arbitrary objects can execute
arbitrary code.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from spectra.models import MODELS, build_model

__all__ = [
    "CheckpointError",
    "UntrustedCheckpointError",
    "KeyMismatchError",
    "LoadedCheckpoint",
    "STATE_DICT_KEYS",
    "file_sha256",
    "located",
    "epoch_from_filename",
    "read_checkpoint_epoch",
    "load_checkpoint",
    "extract_state_dict",
    "strip_wrapper_prefixes",
]

# Keys under which training scripts commonly nest the weights, in lookup order.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net")
# Prefixes added by nn.DataParallel / DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
SPECTRA_FORMAT = "spectra-checkpoint"


class CheckpointError(ValueError):
    """A checkpoint cannot be turned into a model; the message is one line."""


class UntrustedCheckpointError(CheckpointError):
    """The checkpoint holds pickled Python objects and ``trust`` was not given."""


class KeyMismatchError(CheckpointError):
    """The weights do not fit the architecture (missing/unexpected keys or shapes)."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched


@dataclass
class LoadedCheckpoint:
    """A model rebuilt from a checkpoint, with what the file says about itself.

    ``format`` is one of ``spectra``, ``reference``, ``state_dict``,
    ``torchscript``, ``pickled-module``. ``epoch`` is the number of completed
    training epochs: the file's ``epoch`` key, else a number in the file name,
    else -1. ``dataset`` is a :class:`spectra.datasets.DatasetSpec` dict when
    the checkpoint records one.
    """

    model: nn.Module
    path: Path
    sha256: str
    epoch: int
    format: str
    arch: str
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    class_names: list[str] | None = None
    class_counts: list[int] | None = None
    dataset: dict[str, Any] | None = None
    method: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    data_sha256: dict[str, str] | None = None  # split -> content hash of the data it was trained on

    def provenance(self) -> dict[str, Any]:
        """JSON-able description (everything but the model itself)."""
        return {
            "checkpoint_path": str(located(self.path)),
            "checkpoint_sha256": self.sha256,
            "checkpoint_format": self.format,
            "epoch": self.epoch,
            "arch": self.arch,
            "arch_kwargs": dict(self.arch_kwargs),
            "num_classes": self.num_classes,
            "method": self.method,
        }


# ------------------------------------------------------------------ helpers
def _data_hashes(value: Any) -> dict[str, str] | None:
    """A spectra checkpoint's ``data_sha256`` ({split: hex}), None when absent or malformed."""
    if isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return dict(value)
    return None


def located(path: str | os.PathLike[str]) -> Path:
    """Absolute path of a checkpoint in the folder it was found in: the folder is
    resolved (a symlinked run folder is its target), the file is not (a symlink
    to another run's checkpoint belongs to the folder that holds the link)."""
    path = Path(path)
    return path.absolute().parent.resolve() / path.name


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes (identifies a checkpoint in the results store)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_EPOCH_PATTERNS = (
    re.compile(r"epoch[_\-]?(\d+)", re.IGNORECASE),
    # a trailing number after _ - or a dot that ends a word (``model.20``), not a version's ``v1.2``
    re.compile(r"(?:^|[_\-]|(?<=[^\d.])\.)(?:ep|e)?(\d+)$", re.IGNORECASE),
)


def epoch_from_filename(path: str | os.PathLike[str]) -> int | None:
    """Epoch number in a file name: ``ckpt_epoch0010.pt`` → 10, ``model_20.pth`` → 20.

    A number glued to letters (``resnet32.pt``) is a name, not an epoch.
    """
    stem = Path(path).name
    for suffix in (".tar", ".pth", ".pt", ".ckpt", ".bin"):
        stem = stem.removesuffix(suffix)
    for pattern in _EPOCH_PATTERNS:
        match = pattern.search(stem)
        if match:
            return int(match.group(1))
    return None


def _is_torchscript(path: Path) -> bool:
    # TorchScript archives are zip files with a ``<name>/constants.pkl`` and
    # ``<name>/code/`` entries; torch.save zips have neither.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("/constants.pkl") for name in zf.namelist())


def _numpy_safe_globals() -> list[Any]:
    # numpy arrays (e.g. a saved numpy RNG state) are plain data; allowing their
    # reconstruction keeps such checkpoints loadable under weights_only.
    core = getattr(np, "_core", None) or np.core
    dtype_classes = [
        getattr(np.dtypes, name) for name in dir(getattr(np, "dtypes", object))
        if name.endswith("DType") and name != "ObjectDType"
    ]
    return [np.ndarray, np.dtype, core.multiarray._reconstruct, *dtype_classes]


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if empty): errors shown to users are one line."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _unsafe_globals(path: Path) -> list[str]:
    """Objects the file would unpickle beyond weights_only's allowlist (and ours),
    user classes first (they say most about what the file holds)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint: cannot tell, report nothing
        return []
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in _numpy_safe_globals()}
    return sorted((n for n in names if n not in allowed), key=lambda n: (n.startswith("torch."), n))


def _torch_load(path: Path, trust: bool, map_location: Any) -> Any:
    """``torch.load`` with weights_only semantics unless ``trust``."""
    if trust:
        try:
            return torch.load(path, map_location=map_location, weights_only=False)
        except Exception as exc:
            raise CheckpointError(f"cannot read checkpoint {path}: {first_line(exc)}") from exc
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        unsafe = _unsafe_globals(path)
        if unsafe:
            shown = ", ".join(unsafe[:4]) + (", ..." if len(unsafe) > 4 else "")
            raise UntrustedCheckpointError(
                f"{path} contains pickled Python objects ({shown}); loading it runs code from the file. "
                f"Pass --trust-checkpoint (trust=True) only if you trust its source, or re-save it as a state_dict"
            ) from exc
        kind = _foreign_file_kind(path)
        if kind:
            raise CheckpointError(f"cannot read checkpoint {path}: it is {kind}, not a PyTorch checkpoint") from exc
        if "Weights only load failed" in str(exc):  # a legacy (non-zip) pickle: its objects cannot be listed
            raise UntrustedCheckpointError(
                f"{path} needs full unpickling (it holds objects beyond tensors and plain containers); loading it "
                f"runs code from the file. Pass --trust-checkpoint (trust=True) only if you trust its source"
            ) from exc
        raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch checkpoint ({first_line(exc)})") from exc


# Leading bytes of files passed as checkpoints by mistake.
_SIGNATURES = ((b"\x89HDF\r\n\x1a\n", "an HDF5 file (a spectra results file?)"), (b"\x89PNG", "a PNG image"),
               (b"%PDF", "a PDF document"))


def _foreign_file_kind(path: Path) -> str | None:
    """What a file torch.load refused evidently is (empty, HDF5, image, text), or None."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError:
        return None
    if not head:
        return "empty"
    for signature, kind in _SIGNATURES:
        if head.startswith(signature):
            return kind
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "a text file"
    return None


def _is_tensor_mapping(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def extract_state_dict(obj: Any) -> tuple[dict[str, torch.Tensor], str | None]:
    """Find the weights in a loaded checkpoint object.

    Returns ``(state_dict, key)`` where ``key`` is the wrapper key it was found
    under (``None`` for a bare state dict). Raises :class:`CheckpointError` if
    there are no weights.
    """
    if _is_tensor_mapping(obj):
        return dict(obj), None
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            inner = obj.get(key)
            if _is_tensor_mapping(inner):
                return dict(inner), key
        keys = ", ".join(sorted(map(str, obj.keys()))[:8])
        raise CheckpointError(
            f"no weights found: expected a state_dict or a dict with one of "
            f"{', '.join(STATE_DICT_KEYS)} (keys present: {keys})"
        )
    raise CheckpointError(f"no weights found: the checkpoint holds a {type(obj).__name__}, not a state_dict")


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``module.`` (DataParallel) and ``_orig_mod.`` (torch.compile)
    prefixes, only when every key carries them (so real submodule names survive)."""
    sd = dict(state_dict)
    changed = True
    while changed and sd:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def _infer_builtin_kwargs(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Classes and head type of a built-in CIFAR ResNet, read off its head.

    ``nn.Linear`` stores ``linear.weight`` as (classes, 64) with a bias; the
    cosine head ``NormedLinear`` stores (64, classes) and has no bias.
    """
    weight = state_dict.get("linear.weight")
    if weight is None or weight.dim() != 2:
        return {}
    if "linear.bias" in state_dict:
        return {"num_classes": int(weight.shape[0]), "cosine_head": False}
    return {"num_classes": int(weight.shape[1]), "cosine_head": True}


def _short_list(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], arch: str) -> None:
    """``load_state_dict`` that reports every mismatch on one line."""
    own = model.state_dict()
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    # BatchNorm fills in a missing num_batches_tracked itself (old checkpoints).
    missing = sorted(k for k in own if k not in state_dict and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state_dict if k not in own)
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_short_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_short_list(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}, checkpoint vs model): {_short_list(mismatched, 3)}")
        raise KeyMismatchError(
            f"weights do not fit architecture {arch!r}: " + "; ".join(parts), missing, unexpected, mismatched
        )
    model.load_state_dict(state_dict, strict=False)


def _build(arch: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        return build_model(arch, **kwargs)
    except TypeError as exc:
        raise CheckpointError(f"cannot build architecture {arch!r} with arguments {kwargs}: {first_line(exc)}") from exc


# ------------------------------------------------------------------ loading
def read_checkpoint_epoch(path: str | os.PathLike[str]) -> int:
    """The epoch a checkpoint was saved at (``epoch`` key, file name, or -1),
    without building the model. TorchScript and unreadable files use the name."""
    path = Path(path)
    if not _is_torchscript(path):
        try:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                obj = torch.load(path, map_location="cpu", weights_only=True)
            return _epoch_of(obj, path)
        except Exception:
            pass
    found = epoch_from_filename(path)
    return -1 if found is None else found


def _epoch_of(obj: Any, path: Path) -> int:
    if isinstance(obj, Mapping):
        value = obj.get("epoch")
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return int(value)
    found = epoch_from_filename(path)
    return -1 if found is None else found


def _method_text(method: Any) -> str | None:
    if method is None:
        return None
    return method if isinstance(method, str) else json.dumps(method, sort_keys=True, default=str)


def _class_name(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def _builtin_match(state_dict: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any]] | None:
    """The built-in architecture whose weights have exactly these names and shapes."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    kwargs = _infer_builtin_kwargs(state_dict)
    if not kwargs:
        return None
    for name in MODELS:
        own = build_model(name, **kwargs).state_dict()
        if {k: tuple(v.shape) for k, v in own.items()} == shapes:
            return name, kwargs
    return None


def _load_torchscript(
    path: Path, sha: str, arch: str | None, arch_kwargs: Mapping[str, Any] | None, map_location: Any
) -> LoadedCheckpoint:
    """A TorchScript archive, rebuilt as an eager model when its architecture is
    known (``arch``) or recognised among the built-ins: Hessian machinery built
    on ``torch.func`` cannot differentiate a scripted module functionally."""
    try:
        scripted = torch.jit.load(str(path), map_location=map_location)
    except Exception as exc:
        raise CheckpointError(f"cannot read TorchScript archive {path}: {first_line(exc)}") from exc
    found = epoch_from_filename(path)
    epoch = -1 if found is None else found
    state_dict = {k: v.detach().clone() for k, v in scripted.state_dict().items()}
    if arch is not None:
        kwargs = {**(_infer_builtin_kwargs(state_dict) if arch in MODELS else {}), **(arch_kwargs or {})}
        match: tuple[str, dict[str, Any]] | None = (arch, kwargs)
    else:
        match = _builtin_match(state_dict)
    if match is None:
        return LoadedCheckpoint(model=scripted, path=path, sha256=sha, epoch=epoch, format="torchscript",
                                arch=f"torchscript:{getattr(scripted, 'original_name', 'module')}")
    name, kwargs = match
    model = _build(name, kwargs)
    _load_weights(model, state_dict, name)
    return LoadedCheckpoint(model=model.eval(), path=path, sha256=sha, epoch=epoch, format="torchscript",
                            arch=name, arch_kwargs=kwargs, num_classes=kwargs.get("num_classes"))


def load_checkpoint(
    path: str | os.PathLike[str],
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust: bool = False,
    map_location: Any = "cpu",
) -> LoadedCheckpoint:
    """Rebuild the model stored in ``path`` and collect its metadata.

    ``arch`` (a built-in name such as ``resnet32`` or ``package.module:Class``)
    and ``arch_kwargs`` override what the checkpoint says; they are required
    for plain state dicts. ``trust=True`` permits full unpickling (pickled
    modules); never pass it for files from unknown sources.

    Raises ``FileNotFoundError`` for a missing file, :class:`UntrustedCheckpointError`,
    :class:`KeyMismatchError` or :class:`CheckpointError` otherwise; every
    message is one line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    sha = file_sha256(path)
    if _is_torchscript(path):
        return _load_torchscript(path, sha, arch, arch_kwargs, map_location)

    obj = _torch_load(path, trust, map_location)
    epoch = _epoch_of(obj, path)

    # A pickled module (only reachable with trust=True) is the model itself.
    module = obj if isinstance(obj, nn.Module) else None
    if module is None and isinstance(obj, Mapping):
        module = next((obj[k] for k in STATE_DICT_KEYS if isinstance(obj.get(k), nn.Module)), None)
    if module is not None:
        return LoadedCheckpoint(model=module, path=path, sha256=sha, epoch=epoch, format="pickled-module",
                                arch=_class_name(module))

    meta: Mapping[str, Any] = obj if isinstance(obj, Mapping) else {}
    state_dict, _ = extract_state_dict(obj)
    state_dict = strip_wrapper_prefixes(state_dict)

    if meta.get("format") == SPECTRA_FORMAT:
        fmt = "spectra"
    elif "arch" in meta and "state_dict" in meta:
        fmt = "reference"
    else:
        fmt = "state_dict"

    stored_arch = meta.get("arch") if isinstance(meta.get("arch"), str) else None
    name = arch or stored_arch
    if name is None:
        raise CheckpointError(
            f"{path} holds only weights; pass --arch NAME (built-ins: {', '.join(MODELS)}) "
            f"or --arch package.module:Class with --arch-kwargs JSON"
        )
    if name not in MODELS and ":" not in name:
        origin = "from the checkpoint; pass --arch to override" if arch is None else "given with --arch"
        raise CheckpointError(
            f"unknown architecture {name!r} ({origin}); built-ins: {', '.join(MODELS)}, or package.module:Class"
        )

    kwargs: dict[str, Any] = {}
    if name in MODELS:
        kwargs.update(_infer_builtin_kwargs(state_dict))
    if fmt == "spectra" and name == stored_arch and isinstance(meta.get("arch_kwargs"), Mapping):
        kwargs.update(meta["arch_kwargs"])
    if arch_kwargs:
        kwargs.update(arch_kwargs)
    model = _build(name, kwargs)
    _load_weights(model, state_dict, name)

    num_classes = meta.get("num_classes", kwargs.get("num_classes"))
    extra = {k: meta[k] for k in ("best_acc1", "metrics", "config") if k in meta}
    if isinstance(extra.get("best_acc1"), torch.Tensor):
        extra["best_acc1"] = float(extra["best_acc1"])
    return LoadedCheckpoint(
        model=model,
        path=path,
        sha256=sha,
        epoch=epoch,
        format=fmt,
        arch=name,
        arch_kwargs=kwargs,
        num_classes=int(num_classes) if isinstance(num_classes, (int, np.integer)) else None,
        class_names=list(meta["class_names"]) if isinstance(meta.get("class_names"), (list, tuple)) else None,
        class_counts=[int(c) for c in meta["class_counts"]] if isinstance(meta.get("class_counts"), (list, tuple)) else None,
        dataset=dict(meta["dataset"]) if isinstance(meta.get("dataset"), Mapping) else None,
        method=_method_text(meta.get("method")),
        extra=extra,
        data_sha256=_data_hashes(meta.get("data_sha256")),
    )
