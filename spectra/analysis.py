"""One per-class Hessian analysis of one checkpoint, with provenance.

One *job* is (checkpoint, class, settings) → :class:`~spectra.store.ResultRecord`:
the Hessian is that of the mean loss over every sample of the class,

    H_c = ∇²_θ (1/N_c) Σ_{i: y_i = c} ℓ(f_θ(x_i), y_i),

with the model in eval mode, augmentation off and the data set's
normalisation applied (the samples come from :mod:`spectra.class_data`).
``kind`` chooses what is computed: ``eigs`` (λmax, λmin by Lanczos with true
residuals), ``density`` (spectral density by stochastic Lanczos quadrature)
or ``trace`` (Hutch++ / Hutchinson). Sweeps over checkpoints × classes, into
a results file, are :mod:`spectra.sweep`.

Under ``torchrun`` (a ``torch.distributed`` group with several ranks) a job
by default runs on every rank, each with its block of the class's samples;
the operator all-reduces its products, so every rank computes the same
result (see ``docs/distributed.md``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

import spectra
from spectra.checkpoints import LoadedCheckpoint, first_line, load_checkpoint, located
from spectra.class_data import AnalysisError, ClassData, DataCache, DataOptions, resolve_classes
from spectra.store import ResultRecord
from spectra.trace import MIN_PROBES

__all__ = [
    "KINDS",
    "LOSSES",
    "AnalysisError",
    "AnalysisSettings",
    "LoadOptions",
    "resolve_device",
    "analyse_class",
    "analyse_checkpoint",
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

    return build_loss(name, class_counts, **_loss_parameters(name, checkpoint))


def _loss_parameters(name: str, checkpoint: LoadedCheckpoint) -> dict[str, float]:
    """The LDAM/VS parameters the checkpoint's training config records (none for CE)."""
    config = checkpoint.extra.get("config") or {}
    keys = {"ce": {}, "ldam": {"max_margin": "ldam_max_margin", "scale": "ldam_scale"},
            "vs": {"gamma": "vs_gamma", "tau": "vs_tau"}}[name]
    return {k: float(config[c]) for k, c in keys.items() if c in config}


# ------------------------------------------------------------------ settings
@dataclass(frozen=True)
class AnalysisSettings:
    """Everything that determines a result besides the checkpoint and the class.

    ``kind`` selects the analysis; the algorithm parameters of the other kinds
    are ignored (and left out of the settings hash). ``params``: parameter-name
    patterns the Hessian is restricted to (None = all trainable parameters).
    ``hvp_method``, ``cuda_graphs`` (replay products as CUDA graphs; ``None`` =
    on for CUDA devices whenever the products allow it, see :func:`uses_cuda_graphs`) and
    ``keep_graph`` (keep the double-backward graph between products; ``None``
    = only for a class held in one batch), see
    :class:`~spectra.HessianOperator`, change how products are formed, not
    what they are, and are not hashed.

    Construction refuses (``AnalysisError``, one line) what the CLI refuses:
    counts below their minimum, ``tol`` outside (0, 1) or NaN, a non-positive
    or non-finite ``sigma``; for ``kind="eigs"`` a ``max_iter`` below
    ``top_k + bottom_k``, for ``kind="trace"`` fewer probes than the method needs.
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
    hvp_method: str = "auto"
    cuda_graphs: bool | None = None
    keep_graph: bool | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise AnalysisError(f"unknown analysis {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.loss not in LOSSES:
            raise AnalysisError(f"unknown loss {self.loss!r}; expected one of {', '.join(LOSSES)}")
        if self.dtype not in ("float32", "float64"):
            raise AnalysisError(f"unknown dtype {self.dtype!r}; expected float32 or float64")
        self._check_numbers()
        if self.cuda_graphs and self.hvp_method == "double-backward":
            raise AnalysisError("CUDA graphs need --hvp forward-over-reverse (or auto)")
        if self.keep_graph and (self.cuda_graphs or self.hvp_method == "forward-over-reverse"):
            raise AnalysisError("--keep-graph keeps double-backward graphs: use it without --cuda-graphs "
                                "and with --hvp auto or double-backward")
        if self.params is not None:
            object.__setattr__(self, "params", tuple(self.params))

    def _check_numbers(self) -> None:
        """The CLI's ranges, so a bad value fails here, not later inside every job of a sweep."""
        counts = {"top_k": 0, "bottom_k": 0, "max_iter": 1, "probes": 1, "steps": 1, "trace_probes": 1, "seed": 0}
        for name, least in counts.items():
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
                raise AnalysisError(f"{name} must be an integer >= {least}, got {value!r}")
        if self.top_k + self.bottom_k == 0:
            raise AnalysisError("ask for at least one eigenvalue (--top-k / --bottom-k)")
        if not _finite_number(self.tol) or not 0 < self.tol < 1:
            raise AnalysisError(f"tol must be a number with 0 < tol < 1, got {self.tol!r}")
        if self.sigma is not None and (not _finite_number(self.sigma) or self.sigma <= 0):
            raise AnalysisError(f"sigma must be a positive finite number (or None), got {self.sigma!r}")
        if self.trace_method not in MIN_PROBES:
            raise AnalysisError(f"unknown trace method {self.trace_method!r}; expected one of {', '.join(MIN_PROBES)}")
        if self.kind == "eigs" and self.max_iter < self.top_k + self.bottom_k:
            raise AnalysisError(f"max_iter {self.max_iter} is fewer than the {self.top_k + self.bottom_k} eigenvalues "
                                "asked for, which need a Lanczos vector each")
        if self.kind == "trace" and self.trace_probes < MIN_PROBES[self.trace_method]:
            raise AnalysisError(f"{self.trace_method} needs at least {MIN_PROBES[self.trace_method]} probes, "
                                f"got {self.trace_probes}")

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
        seed, dtype, loss, parameter selection and the data."""
        payload = {
            "kind": self.kind, "algorithm": self.algorithm, "algorithm_params": self.algorithm_params(),
            "seed": self.seed, "dtype": self.dtype, "loss": self.loss,
            "params": list(self.params) if self.params else None, "data": data_identity,
        }
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and math.isfinite(value)


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


# ----------------------------------------------------------------------- jobs
def _run_name(path: Path) -> str:
    return located(path).parent.name


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
    start = time.perf_counter()
    use_device_cache = data.fits_on(device)
    try:
        H = _class_operator(checkpoint, data, settings, device, batch_size, class_counts,
                            cache_data=use_device_cache, distributed=distributed)
        loss = H.loss()
    except (RuntimeError, IndexError) as exc:
        raise AnalysisError(f"cannot evaluate the model on class {data.class_index}: {first_line(exc)}") from exc
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
        "data_sha256": str(identity.get("content_sha256") or ""),
        "class_counts": class_counts,
        "loss_fn": settings.loss,
        "loss": loss,
        "algorithm": settings.algorithm,
        "algorithm_params": settings.algorithm_params(),
        "params": list(settings.params) if settings.params else None,
        "num_params": int(H.dim),
        "hvp_method": H.product_method,
        "kept_graph": H.keeps_graphs,
        "cuda_graphs": bool(H.graphs and getattr(H._product, "failed", None) is None and device.type == "cuda"),
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


# The last operator built with CUDA graphs: the next class of the same model reuses
# its captured products (HessianOperator.with_data) instead of capturing again, and so
# does the next checkpoint of the same architecture (HessianOperator.load_weights).
_GRAPHED: dict[str, Any] = {}


def _graphs_supported(device: torch.device) -> bool:
    return device.type == "cuda"


def uses_cuda_graphs(settings: AnalysisSettings, device: torch.device) -> bool:
    """Whether products are replayed as CUDA graphs: asked for (``cuda_graphs=True``) or,
    by default (``None``), whenever the device is a GPU and the products are forward-over-reverse
    (``hvp_method`` auto or forward-over-reverse) without a kept double-backward graph.

    Graphs change no result (the first replay of every shape is checked against an eager
    product, any failure falls back to eager products, and by default a model whose padded
    batches would change its loss gets eager products: ``_class_operator``); on an H200 they made one product
    of ResNet-32 2.9x faster (docs/performance.md).
    """
    if not _graphs_supported(device):
        return False
    if settings.cuda_graphs is not None:
        return settings.cuda_graphs
    return settings.hvp_method != "double-backward" and not settings.keep_graph


def _architecture(checkpoint: LoadedCheckpoint) -> tuple[str, str] | None:
    """(arch, arch_kwargs) of a model rebuilt from them, whose non-tensor attributes they
    determine; None for pickled modules and unrebuilt TorchScript, which are not shared."""
    if checkpoint.format == "pickled-module" or checkpoint.arch.startswith("torchscript:"):
        return None
    return checkpoint.arch, json.dumps(checkpoint.arch_kwargs, sort_keys=True, default=str)


def _class_operator(checkpoint: LoadedCheckpoint, data: ClassData, settings: AnalysisSettings,
                    device: torch.device, batch_size: int, class_counts: list[int] | None,
                    cache_data: bool, distributed: bool | None) -> spectra.HessianOperator:
    """The Hessian operator of one class (sharing captured products with the previous class)."""
    batches = spectra.as_batches(data.inputs, data.targets, batch_size)
    graphs = uses_cuda_graphs(settings, device)
    arch = _architecture(checkpoint)
    key = (settings.loss, tuple(sorted(_loss_parameters(settings.loss, checkpoint).items())),
           tuple(class_counts or ()), settings.dtype, settings.params, str(device),
           settings.hvp_method, cache_data, distributed, batch_size, arch)
    last = _GRAPHED.get("operator")
    if graphs and last is not None and _GRAPHED["key"] == key:
        if _GRAPHED["model"]() is checkpoint.model:
            return last.with_data(batches)
        if arch is not None and last.owns_weights:
            try:  # the next checkpoint of the same architecture: its weights into the captured products
                last.load_weights(checkpoint.model)
            except ValueError:
                pass
            else:
                _GRAPHED["model"] = weakref.ref(checkpoint.model)
                return last.with_data(batches)

    def build(graphs: bool) -> spectra.HessianOperator:
        return spectra.HessianOperator(
            checkpoint.model, hessian_loss(settings.loss, class_counts, checkpoint), batches,
            params=list(settings.params) if settings.params else None,
            dtype=torch.float64 if settings.dtype == "float64" else torch.float32, device=device,
            method=settings.hvp_method, eval_mode=True, cache_data=cache_data, distributed=distributed,
            graphs=graphs, keep_graph=settings.keep_graph if cache_data else False,
        )

    H = build(graphs)
    if graphs and settings.cuda_graphs is None:  # by default only: an explicit --cuda-graphs reports the error
        try:
            H.check_static_shapes()
        except ValueError as exc:  # padded rows would change this model's loss (e.g. batch-coupled layers)
            warnings.warn(f"CUDA graphs off: {str(exc).splitlines()[0]}", RuntimeWarning, stacklevel=2)
            return build(False)
    if graphs:
        _GRAPHED.update(operator=H, key=key, model=weakref.ref(checkpoint.model))
    return H


def _compute(H: Any, settings: AnalysisSettings, progress: bool) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Run the algorithm of ``settings.kind``: result arrays and scalar extras."""
    if settings.kind == "eigs":
        if settings.top_k + settings.bottom_k > H.dim:
            raise AnalysisError(f"top-k {settings.top_k} + bottom-k {settings.bottom_k} eigenvalues asked for, but the "
                                f"Hessian has only {H.dim} (its number of parameters); ask for at most {H.dim}")
        which = "both" if settings.top_k and settings.bottom_k else ("top" if settings.top_k else "bottom")
        k = (settings.top_k, settings.bottom_k) if which == "both" else max(settings.top_k, settings.bottom_k)
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
    res = spectra.trace(H, num_probes=settings.trace_probes, method=settings.trace_method, seed=settings.seed,
                        progress=progress)
    return ({"estimate": np.asarray(res.estimate, np.float64), "stderr": np.asarray(res.stderr, np.float64)},
            {"trace_method": res.method})


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
