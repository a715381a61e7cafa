"""Per-class Hessian analyses of checkpoints, with provenance, and resumable sweeps.

One *job* is (checkpoint, class, settings) → :class:`~spectra.store.ResultRecord`:
the Hessian is that of the mean loss over every sample of the class,

    H_c = ∇²_θ (1/N_c) Σ_{i: y_i = c} ℓ(f_θ(x_i), y_i),

with the model in eval mode, augmentation off and the data set's
normalisation applied. ``kind`` chooses what is computed: ``eigs`` (λmax,
λmin by Lanczos with true residuals), ``density`` (spectral density by
stochastic Lanczos quadrature) or ``trace`` (Hutch++ / Hutchinson).

A *sweep* runs every checkpoint × class × kind into one HDF5 file. Each entry
is keyed by the checkpoint's SHA-256, the class, the kind and a hash of the
settings, so a rerun skips what is stored already. :func:`run_sweep` is a
library function with a progress callback; the CLI, training's periodic
analysis and demos call it.

Under ``torchrun`` (a ``torch.distributed`` group with several ranks) the
same functions split the work (see ``docs/distributed.md``): by default each
rank keeps a disjoint block of every class's samples and the operator
all-reduces its products, so every rank computes the same result and only
rank 0 writes; ``run_sweep(..., spread="jobs")`` instead deals whole jobs
to ranks and gathers their records on rank 0.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

import spectra
from spectra import datasets as ds
from spectra import distributed as sd
from spectra.checkpoints import (
    CheckpointError,
    LoadedCheckpoint,
    load_checkpoint,
    read_checkpoint_epoch,
)
from spectra.store import ResultRecord, ResultsWriter, entry_key

__all__ = [
    "KINDS",
    "LOSSES",
    "SPREADS",
    "AnalysisError",
    "AnalysisSettings",
    "DataOptions",
    "LoadOptions",
    "SampleSource",
    "ClassData",
    "DataCache",
    "resolve_device",
    "resolve_classes",
    "analyse_class",
    "analyse_checkpoint",
    "expand_checkpoints",
    "SweepEvent",
    "SweepSummary",
    "run_sweep",
    "open_writer_on_rank_zero",
]

KINDS = ("eigs", "density", "trace")
# Losses whose Hessian can be analysed; each returns the batch MEAN, as the
# operator requires. Class weights (DRW) cancel within one class, so plain CE
# is the loss of every CE-based method restricted to a class; LDAM's margins
# and scale and VS's logit scaling do not cancel, hence "ldam" and "vs".
LOSSES: dict[str, str] = {
    "ce": "plain cross-entropy",
    "ldam": "LDAM: CE(s·(z − m_y e_y), y), margins from the class counts",
    "vs": "vector scaling: CE(Δ⊙z + ι, y) from the class counts",
}


def hessian_loss(name: str, class_counts: Sequence[int] | None, checkpoint: LoadedCheckpoint) -> nn.Module:
    """The loss whose per-class Hessian is analysed (batch mean, no class weights).

    ``ldam``/``vs`` take their margins/scales from the training set's class
    counts and their parameters from the checkpoint's training config when it
    records one (else the reference defaults: max margin 0.5, s = 30; γ = 0.3, τ = 1).
    """
    if name == "ce":
        return nn.CrossEntropyLoss()
    if not class_counts:
        raise AnalysisError(f"--loss {name} needs the class counts of the training set, "
                            "which this checkpoint and data set do not record")
    from .train.losses import build_loss

    config = checkpoint.extra.get("config") or {}
    keys = {"ldam": {"max_margin": "ldam_max_margin", "scale": "ldam_scale"},
            "vs": {"gamma": "vs_gamma", "tau": "vs_tau"}}[name]
    return build_loss(name, class_counts, **{k: float(config[c]) for k, c in keys.items() if c in config})
# How a sweep uses several ranks: every rank on every job with a block of its
# samples ("samples"), or whole jobs dealt to ranks ("jobs").
SPREADS = ("samples", "jobs")


class AnalysisError(ValueError):
    """An analysis cannot run on the given input; the message is one line."""


# ------------------------------------------------------------------ settings
@dataclass(frozen=True)
class AnalysisSettings:
    """Everything that determines a result besides the checkpoint and the class.

    ``kind`` selects the analysis; the algorithm parameters of the other kinds
    are ignored (and left out of the settings hash). ``params``: parameter-name
    patterns the Hessian is restricted to (None = all trainable parameters).
    """

    kind: str = "eigs"
    top_k: int = 1
    bottom_k: int = 1
    tol: float = 1e-5
    max_iter: int = 200
    probes: int = 4
    steps: int = 80
    sigma: float | None = None
    trace_probes: int = 30
    trace_method: str = "hutch++"
    seed: int = 0
    dtype: str = "float32"
    loss: str = "ce"
    params: tuple[str, ...] | None = None
    hvp_method: str = "forward-over-reverse"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise AnalysisError(f"unknown analysis {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.loss not in LOSSES:
            raise AnalysisError(f"unknown loss {self.loss!r}; expected one of {', '.join(LOSSES)}")
        if self.dtype not in ("float32", "float64"):
            raise AnalysisError(f"unknown dtype {self.dtype!r}; expected float32 or float64")
        if self.top_k < 0 or self.bottom_k < 0 or self.top_k + self.bottom_k == 0:
            raise AnalysisError("ask for at least one eigenvalue (--top-k / --bottom-k)")
        if self.params is not None:
            object.__setattr__(self, "params", tuple(self.params))

    def with_kind(self, kind: str) -> "AnalysisSettings":
        return dataclasses.replace(self, kind=kind)

    @property
    def algorithm(self) -> str:
        return {"eigs": "lanczos", "density": "slq", "trace": self.trace_method}[self.kind]

    def algorithm_params(self) -> dict[str, Any]:
        """The parameters of this kind's algorithm (stored with the result)."""
        if self.kind == "eigs":
            return {"top_k": self.top_k, "bottom_k": self.bottom_k, "tol": self.tol, "max_iter": self.max_iter}
        if self.kind == "density":
            return {"num_probes": self.probes, "num_steps": self.steps, "sigma": self.sigma}
        return {"num_probes": self.trace_probes, "method": self.trace_method}

    def settings_hash(self, data_identity: dict[str, Any]) -> str:
        """SHA-256 of what determines the result: kind, algorithm parameters,
        seed, dtype, loss, parameter selection, HVP method and the data."""
        payload = {
            "kind": self.kind, "algorithm": self.algorithm, "algorithm_params": self.algorithm_params(),
            "seed": self.seed, "dtype": self.dtype, "loss": self.loss,
            "params": list(self.params) if self.params else None, "data": data_identity,
        }
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class DataOptions:
    """Which samples feed the Hessian and where they are computed.

    ``dataset``: a built-in name (cifar10, cifar100, cifar10-lt, cifar100-lt),
    ``package.module:function`` (a factory returning a Dataset or an
    ``(inputs, targets)`` pair), or None for the data set the checkpoint
    records. ``imbalance_ratio`` / ``profile`` / ``lt_seed`` override the
    long-tailed construction. ``max_samples`` caps the samples *per class*
    (the first ones in data-set order).
    """

    dataset: str | None = None
    root: str | None = None
    split: str = "train"
    imbalance_ratio: float | None = None
    profile: str | None = None
    lt_seed: int | None = None
    download: bool = False
    max_samples: int | None = None
    batch_size: int = 1000
    device: str = "auto"


@dataclass
class LoadOptions:
    """How to read checkpoints (see :func:`spectra.checkpoints.load_checkpoint`)."""

    arch: str | None = None
    arch_kwargs: dict[str, Any] | None = None
    trust: bool = False


def resolve_device(name: str | None) -> torch.device:
    """``auto`` → the GPU when there is one, else the CPU."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise AnalysisError(f"unknown device {name!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AnalysisError(f"device {name!r} requested but CUDA is not available")
    return device


# ---------------------------------------------------------------------- data
@dataclass
class SampleSource:
    """One split in memory, before class selection.

    ``labels[i]`` and ``ids[i]`` (the sample's index into the split, hashed
    into the provenance) describe sample i; ``fetch(positions)`` returns the
    model inputs of those samples, normalised, as a float tensor.
    """

    description: dict[str, Any]
    identity: dict[str, Any]
    labels: torch.Tensor
    ids: torch.Tensor
    class_names: list[str]
    fetch: Callable[[torch.Tensor], torch.Tensor]

    @property
    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(self.class_names)).tolist()


@dataclass
class ClassData:
    """The samples of one class, ready for the operator.

    Under several ranks ``inputs``/``targets`` hold this rank's block only;
    ``ids_sha256`` and ``total_samples`` always describe the whole class.
    """

    class_index: int
    class_name: str
    inputs: torch.Tensor
    targets: torch.Tensor
    ids_sha256: str
    total_samples: int | None = None

    @property
    def num_samples(self) -> int:
        """Samples of the whole class (every rank's block together)."""
        return int(self.targets.shape[0]) if self.total_samples is None else self.total_samples


def _builtin_spec(options: DataOptions, recorded: dict[str, Any] | None) -> ds.DatasetSpec:
    """The built-in data set spec: the checkpoint's, overridden by the options."""
    if options.dataset is not None:
        base: dict[str, Any] = {"name": options.dataset}
        if recorded and recorded.get("name") == options.dataset:
            base = dict(recorded)  # same data set: keep its imbalance settings
    elif recorded is not None:
        base = dict(recorded)
    else:
        raise AnalysisError(
            "the checkpoint does not record its data set; pass --dataset "
            f"({', '.join(ds.DATASET_NAMES)} or package.module:function)"
        )
    base["split"] = options.split
    base["max_samples"] = None  # spectra caps per class instead
    for key, value in (("imbalance_ratio", options.imbalance_ratio), ("profile", options.profile),
                       ("seed", options.lt_seed)):
        if value is not None:
            base[key] = value
    # Root: the option, else $SPECTRA_DATA_ROOT / the default, unless the
    # checkpoint's recorded root exists on this machine.
    if options.root is not None:
        base["root"] = str(Path(options.root).expanduser().resolve())
    elif os.environ.get(ds.DATA_ROOT_ENV) or not (base.get("root") and Path(base["root"]).exists()):
        base["root"] = None
    try:
        return ds.DatasetSpec.from_dict(base)
    except ValueError as exc:
        raise AnalysisError(str(exc)) from exc


def _builtin_source(spec: ds.DatasetSpec, download: bool) -> SampleSource:
    if download:
        try:
            ds.download_cifar(spec.base, spec.root)
        except RuntimeError as exc:
            raise AnalysisError(str(exc)) from exc
    loaded = ds.load_dataset(spec)
    images = loaded.images

    def fetch(positions: torch.Tensor) -> torch.Tensor:
        return ds.normalize(images[positions])  # no augmentation, reference normalisation

    description = spec.to_dict()
    description.pop("max_samples", None)
    identity = {k: v for k, v in description.items() if k != "root"}
    return SampleSource(description=description, identity=identity, labels=loaded.labels.long(),
                        ids=loaded.indices.long(), class_names=list(loaded.class_names), fetch=fetch)


def _user_source(factory: str, split: str) -> SampleSource:
    dataset = ds.load_user_dataset(factory)
    names_attr = getattr(dataset, "classes", None)
    if isinstance(dataset, torch.utils.data.TensorDataset):
        inputs, labels = dataset.tensors[0], dataset.tensors[1]

        def fetch(positions: torch.Tensor) -> torch.Tensor:
            return inputs[positions]
    else:
        labels = spectra.data.dataset_targets(dataset)

        def fetch(positions: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.as_tensor(dataset[int(i)][0]) for i in positions])
    labels = torch.as_tensor(labels).long().reshape(-1)
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    names = [str(n) for n in names_attr] if isinstance(names_attr, (list, tuple)) else [str(c) for c in range(num_classes)]
    description = {"factory": factory, "split": split}
    return SampleSource(description=description, identity=dict(description), labels=labels,
                        ids=torch.arange(len(labels)), class_names=names, fetch=fetch)


class DataCache:
    """Loads each data set once per sweep and hands out class subsets.

    ``rank``/``world``: which block of each class's samples to hand out
    (:func:`spectra.distributed.shard_range`); None = the current process
    group's (the whole class in a single process). Pass ``rank=0, world=1``
    to get whole classes under ``torchrun`` (jobs spread over ranks).
    """

    def __init__(self, options: DataOptions, rank: int | None = None, world: int | None = None) -> None:
        self.options = options
        self.rank, self.world = rank, world
        self._sources: dict[str, SampleSource] = {}

    def spec_for(self, checkpoint: LoadedCheckpoint) -> tuple[str, Any]:
        """``("builtin", DatasetSpec)`` or ``("factory", "pkg.mod:func")`` for this checkpoint."""
        if self.options.dataset is not None and ":" in self.options.dataset:
            return "factory", self.options.dataset
        return "builtin", _builtin_spec(self.options, checkpoint.dataset)

    def identity(self, checkpoint: LoadedCheckpoint) -> dict[str, Any]:
        """Machine-independent description of the data (for the settings hash)."""
        kind, spec = self.spec_for(checkpoint)
        if kind == "factory":
            d: dict[str, Any] = {"factory": spec, "split": self.options.split}
        else:
            d = spec.to_dict()
            d.pop("root", None)
        d["max_samples_per_class"] = self.options.max_samples
        return d

    def source(self, checkpoint: LoadedCheckpoint) -> SampleSource:
        kind, spec = self.spec_for(checkpoint)
        key = json.dumps(spec if kind == "factory" else spec.to_dict(), sort_keys=True)
        if key not in self._sources:
            if kind == "factory":
                self._sources[key] = _user_source(spec, self.options.split)
            else:
                self._sources[key] = _builtin_source(spec, self.options.download)
        return self._sources[key]

    def class_data(self, checkpoint: LoadedCheckpoint, class_index: int) -> ClassData:
        """The samples of ``class_index`` (at most ``max_samples``), normalised:
        this rank's block of them; the provenance hash covers the whole class."""
        source = self.source(checkpoint)
        _check_class_range(class_index, source.class_names)
        positions = torch.nonzero(source.labels == class_index).flatten()
        if self.options.max_samples is not None:
            positions = positions[: int(self.options.max_samples)]
        name = source.class_names[class_index]
        if len(positions) == 0:
            where = source.description.get("name") or source.description.get("factory")
            raise AnalysisError(f"class {class_index} ({name}) has no samples in {where} ({self.options.split} split)")
        ids = source.ids[positions].to(torch.int64).numpy().astype("<i8")
        rank = sd.current_rank() if self.rank is None else self.rank
        world = sd.current_world_size() if self.world is None else self.world
        start, stop = sd.shard_range(len(positions), rank, world)
        mine = positions[start:stop]  # fetch (decode, normalise) only this rank's block
        return ClassData(
            class_index=class_index, class_name=name, inputs=source.fetch(mine),
            targets=source.labels[mine].clone(), ids_sha256=hashlib.sha256(ids.tobytes()).hexdigest(),
            total_samples=len(positions),
        )


def _check_class_range(class_index: int, class_names: Sequence[str]) -> None:
    if not 0 <= class_index < len(class_names):
        raise AnalysisError(
            f"class {class_index} is out of range: the data set has {len(class_names)} classes "
            f"(0-{len(class_names) - 1})"
        )


def resolve_classes(spec: str | int | Iterable[str | int], class_names: Sequence[str]) -> list[int]:
    """Class indices from ``all``, an index, a name, or a comma-separated mix."""
    items: list[str | int]
    if isinstance(spec, int):
        items = [spec]
    elif isinstance(spec, str):
        if spec.strip().lower() == "all":
            return list(range(len(class_names)))
        items = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        items = list(spec)
    if not items:
        raise AnalysisError("no class given")
    lowered = {n.lower(): i for i, n in enumerate(class_names)}
    out: list[int] = []
    for item in items:
        if isinstance(item, int) or str(item).lstrip("-").isdigit():
            index = int(item)
            _check_class_range(index, class_names)
        elif str(item).lower() in lowered:
            index = lowered[str(item).lower()]
        else:
            shown = ", ".join(class_names[:12]) + (", ..." if len(class_names) > 12 else "")
            raise AnalysisError(f"unknown class {item!r}; classes: {shown}")
        if index not in out:
            out.append(index)
    return out


# ----------------------------------------------------------------------- jobs
def _fits_on_device(tensor: torch.Tensor, device: torch.device) -> bool:
    """Hold the class's data on the GPU when it takes under half the free memory."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return tensor.element_size() * tensor.numel() < free // 2


def _run_name(path: Path) -> str:
    return path.resolve().parent.name


def analyse_class(
    checkpoint: LoadedCheckpoint,
    data: ClassData,
    settings: AnalysisSettings,
    device: torch.device,
    batch_size: int = 1000,
    data_description: dict[str, Any] | None = None,
    data_identity: dict[str, Any] | None = None,
    class_counts: list[int] | None = None,
    progress: bool = False,
    distributed: bool | None = None,
) -> ResultRecord:
    """Run one analysis of one class's Hessian; returns the result with provenance.

    ``distributed``: passed to :class:`~spectra.HessianOperator` — None
    all-reduces the products over the process group when it has several ranks
    (``data`` is then this rank's block), False keeps the job on this rank
    (jobs spread over ranks: ``data`` must be the whole class).

    Raises :class:`AnalysisError` for a non-finite loss or result, and for a
    model the Hessian machinery cannot differentiate.
    """
    if isinstance(checkpoint.model, torch.jit.ScriptModule):
        raise AnalysisError(
            f"{checkpoint.path} is a TorchScript model whose architecture spectra could not recognise; "
            "pass --arch NAME (and --arch-kwargs) so it is rebuilt from the archive's weights"
        )
    dtype = torch.float64 if settings.dtype == "float64" else torch.float32
    start = time.perf_counter()
    use_device_cache = _fits_on_device(data.inputs, device)
    try:
        H = spectra.HessianOperator(
            checkpoint.model, hessian_loss(settings.loss, class_counts, checkpoint),
            spectra.as_batches(data.inputs, data.targets, batch_size),
            params=list(settings.params) if settings.params else None, dtype=dtype, device=device,
            method=settings.hvp_method, eval_mode=True, cache_data=use_device_cache, distributed=distributed,
        )
        loss = H.loss()
    except (RuntimeError, IndexError) as exc:
        raise AnalysisError(f"cannot evaluate the model on class {data.class_index}: {_first_line(exc)}") from exc
    if not math.isfinite(loss):
        raise AnalysisError(
            f"the loss is not finite ({loss}) on class {data.class_index} ({data.class_name}) "
            f"at {checkpoint.path}; the checkpoint has diverged or does not match the data"
        )
    arrays, extra = _compute(H, settings, progress)
    for name, value in arrays.items():
        if not np.all(np.isfinite(value)):
            raise AnalysisError(f"the {settings.kind} result '{name}' is not finite on class {data.class_index}")
    wall = time.perf_counter() - start
    identity = data_identity or {}
    provenance: dict[str, Any] = {
        "kind": settings.kind,
        "settings_hash": settings.settings_hash(identity),
        **checkpoint.provenance(),
        "run": _run_name(checkpoint.path),
        "method": checkpoint.method or "",
        "model": checkpoint.arch,
        "model_kwargs": checkpoint.arch_kwargs,
        "dataset": data_description or {},
        "split": (data_description or {}).get("split", ""),
        "class_index": data.class_index,
        "class_name": data.class_name,
        "num_samples": int(H.num_samples),  # the global count under several ranks
        "sample_indices_sha256": data.ids_sha256,
        "class_counts": class_counts,
        "loss_fn": settings.loss,
        "loss": loss,
        "algorithm": settings.algorithm,
        "algorithm_params": settings.algorithm_params(),
        "params": list(settings.params) if settings.params else None,
        "num_params": int(H.dim),
        "hvp_method": H.method,
        "seed": settings.seed,
        "dtype": settings.dtype,
        "device": str(device),
        "num_matvecs": int(H.num_matvecs),
        "spectra_version": spectra.__version__,
        "torch_version": torch.__version__,
        "wall_time_s": wall,
        **extra,
    }
    for key in ("arch", "arch_kwargs", "num_classes"):
        provenance.pop(key, None)  # stored as model / model_kwargs
    return ResultRecord(provenance=provenance, arrays=arrays)


def _compute(H: Any, settings: AnalysisSettings, progress: bool) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Run the algorithm of ``settings.kind``: result arrays and scalar extras."""
    if settings.kind == "eigs":
        which = "both" if settings.top_k and settings.bottom_k else ("top" if settings.top_k else "bottom")
        k = max(settings.top_k, settings.bottom_k)
        res = spectra.eigenvalues(H, k=k, which=which, tol=settings.tol, max_iter=settings.max_iter,
                                  seed=settings.seed, progress=progress)
        arrays = {
            "top": np.asarray(res.top[: settings.top_k], np.float64),
            "bottom": np.asarray(res.bottom[: settings.bottom_k], np.float64),
            "top_residuals": np.asarray(res.top_residuals[: settings.top_k], np.float64),
            "bottom_residuals": np.asarray(res.bottom_residuals[: settings.bottom_k], np.float64),
        }
        return arrays, {"converged": bool(res.converged), "tol": float(res.tol)}
    if settings.kind == "density":
        res = spectra.density(H, num_probes=settings.probes, num_steps=settings.steps, seed=settings.seed,
                              sigma=settings.sigma, progress=progress)
        arrays = {"nodes": np.asarray(res.nodes, np.float64), "weights": np.asarray(res.weights, np.float64),
                  "grid": np.asarray(res.grid, np.float64), "values": np.asarray(res.values, np.float64)}
        return arrays, {"sigma": float(res.sigma)}
    res = spectra.trace(H, num_probes=settings.trace_probes, method=settings.trace_method, seed=settings.seed)
    return ({"estimate": np.asarray(res.estimate, np.float64), "stderr": np.asarray(res.stderr, np.float64)},
            {"trace_method": res.method})


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def analyse_checkpoint(
    path: str | os.PathLike[str],
    classes: str | int | Iterable[str | int],
    settings: AnalysisSettings,
    data_options: DataOptions | None = None,
    load_options: LoadOptions | None = None,
    progress: bool = False,
) -> list[ResultRecord]:
    """Analyse several classes of one checkpoint (no store); one record per class."""
    data_options = data_options or DataOptions()
    load_options = load_options or LoadOptions()
    checkpoint = load_checkpoint(path, load_options.arch, load_options.arch_kwargs, load_options.trust)
    cache = DataCache(data_options)
    source = cache.source(checkpoint)
    device = resolve_device(data_options.device)
    records = []
    for c in resolve_classes(classes, source.class_names):
        records.append(analyse_class(
            checkpoint, cache.class_data(checkpoint, c), settings, device, data_options.batch_size,
            source.description, cache.identity(checkpoint), source.class_counts, progress,
        ))
    return records


# --------------------------------------------------------------------- sweeps
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".tar", ".ckpt")


def expand_checkpoints(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Checkpoint files from files and run folders, sorted by epoch.

    A folder contributes its ``ckpt_epoch*.pt`` files (spectra runs) or else
    every ``*.pt``/``*.pth``/``*.tar``/``*.ckpt``; ``last.pt`` only when its
    epoch is not covered by another checkpoint of the folder.
    """
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(path.glob("ckpt_epoch*.pt")) or sorted(
                p for p in path.iterdir() if p.is_file() and p.name.endswith(_CHECKPOINT_SUFFIXES)
                and p.name != "last.pt"
            )
            last = path / "last.pt"
            if last.is_file():
                covered = {read_checkpoint_epoch(p) for p in found}
                if read_checkpoint_epoch(last) not in covered:
                    found.append(last)
            if not found:
                raise FileNotFoundError(f"no checkpoints in {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"checkpoint not found: {path}")
    unique = list(dict.fromkeys(files))
    epochs = {p: read_checkpoint_epoch(p) for p in unique}
    return sorted(unique, key=lambda p: (str(p.resolve().parent), epochs[p], p.name))


@dataclass
class SweepEvent:
    """Progress report of a sweep: one per job (``status`` skipped/done/failed)."""

    index: int
    total: int
    checkpoint: Path
    epoch: int
    class_index: int
    kind: str
    status: str
    message: str = ""
    record: ResultRecord | None = None


@dataclass
class SweepSummary:
    computed: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)


def open_writer_on_rank_zero(out: str | os.PathLike[str]) -> contextlib.AbstractContextManager[ResultsWriter | None]:
    """The results writer on rank 0, None on the other ranks (and no file at all
    when ``out`` is None); the same as ``ResultsWriter(out)`` in a single process.

    Opened before any work so a locked, foreign or unwritable file fails fast;
    the ranks agree on that failure (a collective), so the others do not go on
    alone into the analysis's all-reduces.
    """
    return _writer_on_rank_zero(out)


@contextlib.contextmanager
def _writer_on_rank_zero(out: str | os.PathLike[str] | None) -> Iterator[ResultsWriter | None]:
    writer: ResultsWriter | None = None
    error: BaseException | None = None
    if out is not None and sd.is_writer():
        try:
            writer = ResultsWriter(out)
        except Exception as exc:  # StoreError, StoreLockedError, OSError: re-raised below
            error = exc
    if sd.any_rank(error is not None):
        if error is not None:
            raise error
        raise AnalysisError(f"rank 0 could not open the results file {out}")
    try:
        yield writer
    finally:
        if writer is not None:
            writer.close()


@dataclass
class _SweepPlan:
    """What a sweep needs besides the list of checkpoints."""

    classes: Any
    kinds: Sequence[str]
    settings: AnalysisSettings
    data_options: DataOptions
    load_options: LoadOptions
    device: torch.device
    progress: Callable[[SweepEvent], None] | None


def run_sweep(
    checkpoints: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    classes: str | Iterable[str | int] = "all",
    kinds: Sequence[str] = ("eigs",),
    settings: AnalysisSettings | None = None,
    data_options: DataOptions | None = None,
    load_options: LoadOptions | None = None,
    progress: Callable[[SweepEvent], None] | None = None,
    spread: str = "samples",
) -> SweepSummary:
    """Every checkpoint × class × kind into the results file ``out``, resumably.

    Entries already stored with the same key (checkpoint SHA-256, class, kind,
    settings hash) are skipped. Each new entry is committed as soon as it is
    computed, so an interrupted sweep loses at most the job in flight. A job
    that fails (e.g. non-finite loss) is reported and the sweep goes on.

    Under a process group of several ranks (``torchrun``) every rank must call
    this with the same arguments; rank 0 alone opens ``out``, writes, and calls
    ``progress``, and its summary is the complete one. ``spread="samples"``:
    every rank takes part in every job with a block of the class's samples.
    ``spread="jobs"``: rank 0 lists the jobs not stored yet, they are dealt
    round-robin over the ranks, each rank computes its jobs alone, and the
    records are gathered on rank 0 after every round (a rank that dies loses
    that round only; a rerun computes the rest). In a single process both
    are the same loop.
    """
    if spread not in SPREADS:
        raise AnalysisError(f"unknown spread {spread!r}; expected one of {', '.join(SPREADS)}")
    settings = settings or AnalysisSettings()
    data_options = data_options or DataOptions()
    load_options = load_options or LoadOptions()
    for kind in kinds:
        settings.with_kind(kind)  # validates the kind
    files = expand_checkpoints(checkpoints)
    plan = _SweepPlan(classes, kinds, settings, data_options, load_options,
                      resolve_device(data_options.device), progress)
    with _writer_on_rank_zero(out) as writer:
        if spread == "jobs" and sd.current_world_size() > 1:
            return _sweep_spreading_jobs(files, plan, writer)
        return _sweep_sharing_samples(files, plan, writer)


def _open_job_source(path: Path, plan: _SweepPlan, cache: DataCache) -> tuple[LoadedCheckpoint, list[int], dict[str, Any]]:
    """The checkpoint, its wanted classes and the data identity (for the settings hash)."""
    lo = plan.load_options
    checkpoint = load_checkpoint(path, lo.arch, lo.arch_kwargs, lo.trust)
    names = _class_names_without_loading(checkpoint, plan.classes) or cache.source(checkpoint).class_names
    return checkpoint, resolve_classes(plan.classes, names), cache.identity(checkpoint)


_LOAD_ERRORS = (CheckpointError, AnalysisError, OSError, ValueError)


def _sweep_sharing_samples(files: list[Path], plan: _SweepPlan, writer: ResultsWriter | None) -> SweepSummary:
    """Every rank runs every job on its block of the samples; rank 0 writes.

    Each branch (checkpoint unreadable, entry stored, job failed) is agreed by
    all ranks before it is taken: a rank that went its own way would leave the
    others waiting in the operator's next all-reduce.
    """
    cache = DataCache(plan.data_options)
    summary = SweepSummary()
    report = plan.progress if sd.is_writer() else None
    index, total = 0, 0
    for n, path in enumerate(files):
        error: str | None = None
        try:
            checkpoint, wanted, identity = _open_job_source(path, plan, cache)
        except _LOAD_ERRORS as exc:
            error = _first_line(exc)
        if sd.any_rank(error is not None):
            message = error or "could not be read on another rank"
            summary.failed.append(f"{path}: {message}")
            if report:
                report(SweepEvent(index, total, path, -1, -1, "", "failed", message))
            continue
        if total == 0:  # estimated from the first readable checkpoint
            total = len(files[n:]) * len(wanted) * len(plan.kinds)
        for c in wanted:
            for kind in plan.kinds:
                job = plan.settings.with_kind(kind)
                key = entry_key(checkpoint.sha256, c, kind, job.settings_hash(identity))
                index += 1
                event = SweepEvent(index, total, path, checkpoint.epoch, c, kind, "skipped")
                if sd.broadcast_from_writer(writer is not None and writer.has(key)):
                    summary.skipped += 1
                else:
                    record, error = None, None
                    try:
                        source = cache.source(checkpoint)
                        record = analyse_class(
                            checkpoint, cache.class_data(checkpoint, c), job, plan.device,
                            plan.data_options.batch_size, source.description, identity, source.class_counts,
                        )
                    except (AnalysisError, ValueError, OSError) as exc:
                        error = _first_line(exc)
                    if sd.any_rank(error is not None):
                        message = error or "failed on another rank"
                        summary.failed.append(f"{path} class {c} {kind}: {message}")
                        event.status, event.message = "failed", message
                    else:
                        _store(writer, record, summary, event, f"{path} class {c} {kind}")
                if report:
                    report(event)
    return summary


def _store(writer: ResultsWriter | None, record: ResultRecord | None, summary: SweepSummary,
           event: SweepEvent, label: str) -> None:
    """Commit ``record`` (on the writer rank; the others only count it)."""
    try:
        if writer is not None and record is not None:
            writer.write(record)
        summary.computed += 1
        event.status, event.record = "done", record
    except (OSError, ValueError) as exc:
        summary.failed.append(f"{label}: {_first_line(exc)}")
        event.status, event.message = "failed", _first_line(exc)


# One job of a sweep spread over ranks: (checkpoint path, class, kind).
_Job = tuple[str, int, str]


def _pending_jobs(files: list[Path], plan: _SweepPlan, writer: ResultsWriter, summary: SweepSummary,
                  ) -> tuple[list[_Job], list[SweepEvent]]:
    """Rank 0's list of the jobs not stored yet, and events for the skipped ones."""
    cache = DataCache(plan.data_options, rank=0, world=1)
    pending: list[_Job] = []
    events: list[SweepEvent] = []
    for path in files:
        try:
            checkpoint, wanted, identity = _open_job_source(path, plan, cache)
        except _LOAD_ERRORS as exc:
            summary.failed.append(f"{path}: {_first_line(exc)}")
            events.append(SweepEvent(0, 0, path, -1, -1, "", "failed", _first_line(exc)))
            continue
        for c in wanted:
            for kind in plan.kinds:
                key = entry_key(checkpoint.sha256, c, kind, plan.settings.with_kind(kind).settings_hash(identity))
                if writer.has(key):
                    summary.skipped += 1
                    events.append(SweepEvent(0, 0, path, checkpoint.epoch, c, kind, "skipped"))
                else:
                    pending.append((str(path), c, kind))
    return pending, events


class _JobRunner:
    """Computes whole jobs on this rank alone (``distributed=False``), keeping
    the last checkpoint loaded (a rank's jobs come mostly from one file)."""

    def __init__(self, plan: _SweepPlan) -> None:
        self.plan = plan
        self.cache = DataCache(plan.data_options, rank=0, world=1)
        self._loaded: tuple[str, LoadedCheckpoint, dict[str, Any]] | None = None

    def __call__(self, job: _Job) -> tuple[str, Any]:
        """``("done", record)`` or ``("failed", message)``; never raises (a rank
        that raised would leave the others waiting in the next gather)."""
        path, c, kind = job
        try:
            if self._loaded is None or self._loaded[0] != path:
                checkpoint, _, identity = _open_job_source(Path(path), self.plan, self.cache)
                self._loaded = (path, checkpoint, identity)
            _, checkpoint, identity = self._loaded
            source = self.cache.source(checkpoint)
            record = analyse_class(
                checkpoint, self.cache.class_data(checkpoint, c), self.plan.settings.with_kind(kind),
                self.plan.device, self.plan.data_options.batch_size, source.description, identity,
                source.class_counts, distributed=False,  # this rank's own Hessian: no all-reduce
            )
            return "done", record
        except Exception as exc:  # noqa: BLE001 - reported per job, the sweep goes on
            return "failed", _first_line(exc)


def _sweep_spreading_jobs(files: list[Path], plan: _SweepPlan, writer: ResultsWriter | None) -> SweepSummary:
    """Jobs dealt round-robin over ranks; records gathered on rank 0 each round."""
    summary = SweepSummary()
    listed = _pending_jobs(files, plan, writer, summary) if writer is not None else None
    pending: list[_Job] = sd.broadcast_from_writer(listed[0] if listed else None)
    world = sd.current_world_size()
    total = len(pending) + summary.skipped + len(summary.failed)
    index = 0
    report = plan.progress if writer is not None else None
    for event in (listed[1] if listed else []):
        index += 1
        event.index, event.total = index, total
        if report:
            report(event)
    mine = sd.split_jobs(pending)
    run_job = _JobRunner(plan)
    for j in range(sd.num_rounds(len(pending))):
        outcome = run_job(mine[j]) if j < len(mine) else None
        gathered = sd.gather_to_writer(outcome)
        if gathered is None:  # not the writer
            continue
        for r, item in enumerate(gathered):  # rank r's j-th job is pending[j·W + r]
            if item is None:
                continue
            path, c, kind = pending[j * world + r]
            status, value = item
            index += 1
            epoch = value.epoch if status == "done" else -1
            event = SweepEvent(index, total, Path(path), epoch, c, kind, "failed")
            label = f"{path} class {c} {kind}"
            if status == "done":
                _store(writer, value, summary, event, label)
            else:
                summary.failed.append(f"{label}: {value}")
                event.message = value
            if report:
                report(event)
    return summary


def _class_names_without_loading(checkpoint: LoadedCheckpoint, classes: Any) -> list[str] | None:
    """Class names known from the checkpoint alone, when ``classes`` needs no
    names (``all`` or indices): lets a resumed sweep skip loading the data."""
    count = checkpoint.num_classes or (len(checkpoint.class_names) if checkpoint.class_names else None)
    if count is None:
        return None
    items = [classes] if isinstance(classes, (int, str)) else list(classes)
    tokens = [t.strip() for item in items for t in str(item).split(",") if t.strip()]
    if all(t.lower() == "all" or t.lstrip("-").isdigit() for t in tokens):
        return checkpoint.class_names or [str(i) for i in range(count)]
    return None
