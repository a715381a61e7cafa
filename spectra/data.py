"""Data plumbing for Hessian operators: class filtering and batching.

The operator consumes *batches* ``(inputs, targets)``. Everything here turns
what users have (a ``Dataset``, a pair of tensors, a ``DataLoader`` or any
iterable of batches) into such batches, and filters it to a set of classes.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

Batch = tuple[Tensor, Tensor]
DataLike = Union[Dataset, tuple, Iterable[Batch]]


def _class_index(c: Any) -> int:
    """An integer class index (int, numpy integer, integer 0-d tensor); anything else is refused."""
    if isinstance(c, Tensor) and c.ndim == 0 and not c.is_floating_point() and c.dtype != torch.bool:
        return int(c)
    if isinstance(c, (int, np.integer)) and not isinstance(c, (bool, np.bool_)):
        return int(c)
    raise ValueError(f"class_subset takes integer class indices, got {c!r} ({type(c).__name__})")


def is_integer_text(text: str) -> bool:
    """'12' or '-1'; not '²' or '٣', which ``str.isdigit`` accepts but ``int`` reads differently or not at all."""
    digits = text[1:] if text.startswith("-") else text
    return digits.isascii() and digits.isdigit()


def _named_class(name: str, class_names: Sequence[str] | None) -> int:
    """A str class: a whole integer ('12') or one of the data's class names (case-insensitive)."""
    text = name.strip()
    if is_integer_text(text):
        return int(text)
    lowered = {str(n).lower(): i for i, n in enumerate(class_names or [])}
    if text.lower() in lowered:
        return lowered[text.lower()]
    known = f"; classes: {', '.join(map(str, class_names))}" if class_names else " (the data has no class names)"
    raise ValueError(f"unknown class {name!r}: give an integer index or a class name{known}")


def _class_names_of(data: Any) -> Sequence[str] | None:
    """``data.classes`` of a (possibly ``Subset``-wrapped) data set, as torchvision's have."""
    while isinstance(data, Subset):
        data = data.dataset
    names = getattr(data, "classes", None)
    return names if isinstance(names, (list, tuple)) else None


def _as_class_set(classes: Any, class_names: Sequence[str] | None = None) -> list[int]:
    """Class indices from an int, a str (a whole integer or a class name) or an iterable of ints."""
    if isinstance(classes, str):
        return [_named_class(classes, class_names)]
    if not isinstance(classes, Iterable) or (isinstance(classes, Tensor) and classes.ndim == 0):
        return [_class_index(classes)]
    out = [_class_index(c) for c in classes]
    if not out:
        raise ValueError("class_subset needs at least one class")
    return out


def _mask(targets: Tensor, classes: list[int]) -> Tensor:
    targets = torch.as_tensor(targets)
    return torch.isin(targets, torch.tensor(classes, dtype=targets.dtype, device=targets.device))


def is_tensor_pair(data: Any) -> bool:
    """True for ``(inputs, targets)`` given as two tensors of equal length."""
    return (isinstance(data, (tuple, list)) and len(data) == 2
            and all(isinstance(t, Tensor) for t in data)
            and data[0].ndim >= 1 and data[1].ndim >= 1 and len(data[0]) == len(data[1]))


def dataset_targets(dataset: Dataset) -> Tensor:
    """Targets of a map-style dataset, read from ``.targets``/``.labels`` when present."""
    if isinstance(dataset, Subset):
        return dataset_targets(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    for attr in ("targets", "labels"):
        if hasattr(dataset, attr):
            return torch.as_tensor(getattr(dataset, attr))
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))])


def class_subset(data: DataLike, classes: Union[int, str, Iterable[int]]) -> Any:
    """Restrict ``data`` to the samples whose target is in ``classes``.

    ``classes``: an int, an iterable of ints, or a str that is one whole class:
    an integer (``"12"`` is class 12, not classes 1 and 2) or a name from the
    data's ``classes`` attribute. Floats and other types raise ``ValueError``.

    - ``(inputs, targets)`` tensors -> filtered ``(inputs, targets)`` tensors;
    - a map-style ``Dataset`` -> ``torch.utils.data.Subset`` (targets read from
      ``.targets``/``.labels`` when available, else by indexing);
    - any other iterable of ``(inputs, targets)`` batches (e.g. a ``DataLoader``)
      -> a list of filtered batches, empty batches dropped.

    Raises ``ValueError`` when no sample of the requested classes is present.
    """
    wanted = _as_class_set(classes, _class_names_of(data))
    if is_tensor_pair(data):
        x, y = data
        keep = _mask(y, wanted)
        result: Any = (x[keep], y[keep])
        count = int(keep.sum())
    elif isinstance(data, Dataset) and hasattr(data, "__len__") and not isinstance(data, DataLoader):
        keep = _mask(dataset_targets(data), wanted)
        indices = torch.nonzero(keep).flatten().tolist()
        result, count = Subset(data, indices), len(indices)
    else:
        result = []
        for x, y in data:
            keep = _mask(y, wanted)
            if bool(keep.any()):
                result.append((x[keep], torch.as_tensor(y)[keep]))
        count = sum(len(b[1]) for b in result)
    if count == 0:
        raise ValueError(f"no samples of class(es) {wanted} in the data")
    return result


def as_batches(inputs: Tensor, targets: Tensor, batch_size: int | None = None) -> list[Batch]:
    """Split tensors into consecutive batches of ``batch_size`` (the last may be smaller)."""
    if len(inputs) != len(targets):
        raise ValueError(f"inputs ({len(inputs)}) and targets ({len(targets)}) differ in length")
    if batch_size is None or batch_size >= len(targets):
        return [(inputs, targets)]
    if batch_size < 1:
        raise ValueError("batch_size must be a positive integer")
    return [(inputs[i:i + batch_size], targets[i:i + batch_size])
            for i in range(0, len(targets), batch_size)]


def iter_batches(data: DataLike, batch_size: int | None = None) -> Iterator[Batch]:
    """Yield ``(inputs, targets)`` batches from any supported data form.

    A tensor pair is split into ``batch_size`` chunks (one batch when None), a
    map-style ``Dataset`` goes through a ``DataLoader`` (default batch 256,
    no shuffling), anything else is iterated as given.
    """
    if is_tensor_pair(data):
        yield from as_batches(data[0], data[1], batch_size)
    elif isinstance(data, Dataset) and hasattr(data, "__len__") and not isinstance(data, DataLoader):
        yield from DataLoader(data, batch_size=batch_size or 256, shuffle=False)
    else:
        for batch in data:
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise TypeError("data must yield (inputs, targets) batches")
            yield batch[0], torch.as_tensor(batch[1])


def rebatch(batches: Sequence[Batch], batch_size: int) -> list[Batch]:
    """Concatenate batches and cut them again into ``batch_size`` chunks."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    return as_batches(x, y, batch_size)
