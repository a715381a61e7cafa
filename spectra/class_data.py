"""Where a class's samples come from: the data behind each per-class Hessian.

The Hessian of class c is that of the mean loss over the samples of c in one
split of a data set,

    H_c = ∇²_θ (1/N_c) Σ_{i: y_i = c} ℓ(f_θ(x_i), y_i),

so this module decides which samples {x_i : y_i = c} those are: the data set
the checkpoint records (or a built-in / user data set named in
:class:`DataOptions`), the requested split, augmentation off (and a built-in
data set's normalisation applied), at most ``max_samples`` per class (the
first ones in data-set order). :class:`DataCache` loads each data set once and hands out
:class:`ClassData`; the SHA-256 of the chosen sample indices goes into the
provenance of every result.

Under ``torchrun`` (a ``torch.distributed`` group with several ranks) each
rank holds a disjoint block of every class's samples
(:func:`spectra.distributed.shard_range`) and the operator all-reduces its
products, so every rank computes H_c over all N_c samples
(see ``docs/distributed.md``).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from spectra import datasets as ds
from spectra import distributed as sd
from spectra.checkpoints import LoadedCheckpoint
from spectra.data import dataset_targets, is_integer_text

__all__ = [
    "AnalysisError",
    "OtherDataWarning",
    "DataOptions",
    "SampleSource",
    "ClassData",
    "DataCache",
    "resolve_classes",
]


# The error of every analysis step (data, settings, the job itself, sweeps).
# It lives here, at the bottom of class_data <- analysis <- sweep, so each of
# them can raise it; spectra.analysis exports it as part of its API.
class AnalysisError(ValueError):
    """An analysis cannot run on the given input; the message is one line."""


class OtherDataWarning(UserWarning):
    """The images analysed are not those the checkpoint was trained (or, for the test
    split, evaluated) on by its recorded ``data_sha256``, though its data set spec
    selects them: a changed copy."""


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

    def __post_init__(self) -> None:
        """Refuse counts the CLI refuses (``--max-samples``, ``--batch-size`` >= 1), here, not in every job."""
        for name in ("max_samples", "batch_size"):
            value = getattr(self, name)
            if value is None and name == "max_samples":
                continue
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise AnalysisError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class SampleSource:
    """One split in memory, before class selection.

    ``labels[i]`` and ``ids[i]`` (the sample's index into the split, hashed
    into the provenance) describe sample i; ``fetch(positions)`` returns the
    model inputs of those samples, normalised, as a float tensor.
    ``identity``: what the data is, without where it lies (the settings hash
    covers it); its ``content_sha256`` names the samples' pixels and labels
    where they can be hashed cheaply (built-in sets, a ``TensorDataset``).
    ``pixels``: the built-in sets' uint8 NHWC images before normalisation
    (indexed like ``labels``), for callers that transform them; None for factories.
    """

    description: dict[str, Any]
    identity: dict[str, Any]
    labels: torch.Tensor
    ids: torch.Tensor
    class_names: list[str]
    fetch: Callable[[torch.Tensor], torch.Tensor]
    pixels: torch.Tensor | None = None

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

    def fits_on(self, device: torch.device) -> bool:
        """Whether to hold the inputs on ``device``: always off the GPU; on a GPU
        when they take under half its free memory."""
        if device.type != "cuda":
            return True
        free, _ = torch.cuda.mem_get_info(device)
        return self.inputs.element_size() * self.inputs.numel() < free // 2


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
    lt_options = (("imbalance_ratio", "--imbalance-ratio", options.imbalance_ratio),
                  ("profile", "--profile", options.profile), ("seed", "--lt-seed", options.lt_seed))
    given = [flag for _, flag, value in lt_options if value is not None]
    if given and not str(base["name"]).endswith("-lt"):
        raise AnalysisError(f"{'/'.join(given)} only apply to long-tailed data sets (cifar10-lt, cifar100-lt); "
                            f"{base['name']!r} is balanced")
    for key, _, value in lt_options:
        if value is not None:
            base[key] = value
    # Root: the option, else $SPECTRA_DATA_ROOT / the default, unless the
    # checkpoint's recorded root exists on this machine.
    if options.root is not None:
        base["root"] = str(Path(options.root).expanduser().resolve())
    elif os.environ.get(ds.DATA_ROOT_ENV) or not (base.get("root") and Path(base["root"]).exists()):
        base["root"] = str(ds.default_data_root().expanduser().resolve())  # recorded in the results: where the data really came from
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
    # The pixels, not only the spec: a re-encoded copy at another root is other data.
    identity = {k: v for k, v in description.items() if k != "root"} | {"content_sha256": loaded.content_sha256()}
    return SampleSource(description=description, identity=identity, labels=loaded.labels.long(),
                        ids=loaded.indices.long(), class_names=list(loaded.class_names), fetch=fetch, pixels=images)


def _class_labels(labels: torch.Tensor, factory: str) -> torch.Tensor:
    """The factory's targets as int64 class indices; non-integral or negative values are refused
    (truncating 2.7 to class 2 would analyse the wrong samples)."""
    if len(labels) == 0:
        raise AnalysisError(f"the data set factory {factory!r} returned no samples")
    if labels.is_floating_point() and not torch.equal(labels, labels.round()):
        raise AnalysisError(f"the data set factory {factory!r} has non-integer targets (e.g. "
                            f"{labels[labels != labels.round()][0].item():g}); class labels must be integers")
    if labels.is_complex() or labels.dtype == torch.bool:
        raise AnalysisError(f"the data set factory {factory!r} has {labels.dtype} targets; class labels must be integers")
    labels = labels.long()
    if int(labels.min()) < 0:
        raise AnalysisError(f"the data set factory {factory!r} has negative targets ({int(labels.min())}); "
                            "class labels must be 0, 1, ...")
    return labels


def _user_source(factory: str, split: str) -> SampleSource:
    dataset = ds.load_user_dataset(factory)
    names_attr = getattr(dataset, "classes", None)
    content: str | None = None  # a generic Dataset would have to be read whole to be hashed
    if isinstance(dataset, torch.utils.data.TensorDataset):
        inputs, labels = dataset.tensors[0], dataset.tensors[1]
        content = _tensors_sha256(inputs, torch.as_tensor(labels))

        def fetch(positions: torch.Tensor) -> torch.Tensor:
            return inputs[positions]
    else:
        labels = dataset_targets(dataset)

        def fetch(positions: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.as_tensor(dataset[int(i)][0]) for i in positions])
    labels = _class_labels(torch.as_tensor(labels).reshape(-1), factory)
    num_classes = int(labels.max()) + 1
    names = [str(n) for n in names_attr] if isinstance(names_attr, (list, tuple)) else [str(c) for c in range(num_classes)]
    description = {"factory": factory, "split": split}
    identity = dict(description) | ({"content_sha256": content} if content else {})
    return SampleSource(description=description, identity=identity, labels=labels,
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
        self._checked: set[tuple[str, str]] = set()

    def spec_for(self, checkpoint: LoadedCheckpoint) -> tuple[str, Any]:
        """``("builtin", DatasetSpec)`` or ``("factory", "pkg.mod:func")`` for this checkpoint."""
        if self.options.dataset is not None and ":" in self.options.dataset:
            return "factory", self.options.dataset
        return "builtin", _builtin_spec(self.options, checkpoint.dataset)

    def identity(self, checkpoint: LoadedCheckpoint) -> dict[str, Any]:
        """Machine-independent description of the data (for the settings hash):
        the data set without its root, its content hash, the per-class cap."""
        return self.source(checkpoint).identity | {"max_samples_per_class": self.options.max_samples}

    def source(self, checkpoint: LoadedCheckpoint) -> SampleSource:
        kind, spec = self.spec_for(checkpoint)
        key = json.dumps(spec if kind == "factory" else spec.to_dict(), sort_keys=True)
        if key not in self._sources:
            if kind == "factory":
                self._sources[key] = _user_source(spec, self.options.split)
            else:
                self._sources[key] = _builtin_source(spec, self.options.download)
        if kind == "builtin":
            self._warn_if_other_images(checkpoint, spec, self._sources[key])
        return self._sources[key]

    def _warn_if_other_images(self, checkpoint: LoadedCheckpoint, spec: ds.DatasetSpec, source: SampleSource) -> None:
        """Warn (once per data and recorded hash) when the checkpoint's own training (test) images,
        as its spec selects them, are not these: the data at the root was re-encoded or altered since."""
        recorded = (checkpoint.data_sha256 or {}).get(spec.split)
        if recorded is None or not _same_selection(_recorded_selection(checkpoint, spec.split), spec):
            return  # nothing recorded, or other data asked for
        found = str(source.identity.get("content_sha256", ""))
        if found == recorded or (found, recorded) in self._checked:
            return
        self._checked.add((found, recorded))
        used = "trained" if spec.split == "train" else "evaluated"
        warnings.warn(f"the {spec.name} {spec.split} images at {spec.root} are not those {checkpoint.path.name} "
                      f"was {used} on (content SHA-256 {found[:12]}… ≠ recorded {recorded[:12]}…; "
                      "a re-encoded or altered copy?): the Hessians are of these images", OtherDataWarning, stacklevel=3)

    def class_positions(self, checkpoint: LoadedCheckpoint, class_index: int) -> torch.Tensor:
        """Positions in the split (:meth:`source` order) of the samples analysed for ``class_index``:
        its first ``max_samples`` in data-set order (all of this class, every rank)."""
        source = self.source(checkpoint)
        _check_class_range(class_index, source.class_names)
        positions = torch.nonzero(source.labels == class_index).flatten()
        if self.options.max_samples is not None:
            positions = positions[: int(self.options.max_samples)]
        if len(positions) == 0:
            where = source.description.get("name") or source.description.get("factory")
            raise AnalysisError(f"class {class_index} ({source.class_names[class_index]}) has no samples in "
                                f"{where} ({self.options.split} split)")
        return positions

    def class_data(self, checkpoint: LoadedCheckpoint, class_index: int) -> ClassData:
        """The samples of ``class_index`` (at most ``max_samples``), normalised:
        this rank's block of them; the provenance hash covers the whole class."""
        source = self.source(checkpoint)
        positions = self.class_positions(checkpoint, class_index)
        name = source.class_names[class_index]
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


def _recorded_selection(checkpoint: LoadedCheckpoint, split: str) -> dict[str, Any] | None:
    """The recorded spec of the ``split`` samples whose hash the checkpoint holds: its training
    spec, or for the test split that spec with the run's ``max_test_samples`` (None: unknown)."""
    if split == "train" or checkpoint.dataset is None:
        return checkpoint.dataset
    config = checkpoint.extra.get("config")
    if not isinstance(config, dict) or "max_test_samples" not in config:
        return None  # a checkpoint without its training config: the test cap is unknown
    return dict(checkpoint.dataset, split=split, max_samples=config["max_test_samples"])


def _same_selection(recorded: dict[str, Any] | None, spec: ds.DatasetSpec) -> bool:
    """Whether ``spec`` selects the samples the recorded spec (of either split) selected (roots aside)."""
    if recorded is None or recorded.get("max_samples") is not None:
        return False
    try:
        trained = ds.DatasetSpec.from_dict(dict(recorded, root=None)).to_dict()
    except ValueError:
        return False
    mine = spec.to_dict()
    return all(trained.get(k) == mine.get(k) for k in mine if k not in ("root", "max_samples"))


def _tensors_sha256(*tensors: torch.Tensor) -> str:
    """SHA-256 of the tensors' dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # bf16 has no numpy dtype
    return digest.hexdigest()


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
        if isinstance(item, int) or is_integer_text(str(item)):
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
