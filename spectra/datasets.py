"""CIFAR-10/100 and their long-tailed (LT) versions, read from the standard
python-pickle files, plus user-supplied data sets.

Long-tailed construction (Cui et al. 2019; Cao et al. 2019, reference code):

* exponential profile: ``n_c = int(n_max · r^(c / (C - 1)))`` with
  ``r = 1 / imbalance_ratio`` (CIFAR-10, ratio 100: 5000, 2997, ..., 50);
  ``n_max`` is the smallest class's image count (5000 in CIFAR-10 and 500 in
  CIFAR-100, where all classes are equal: the reference's ``len/C``), so that
  every class has the images the profile asks for;
* step profile: the first ``C // 2`` classes keep ``n_max``, the rest
  ``int(n_max · r)``;
* selection: ``np.random.seed(seed)`` once, then for each class in label order
  shuffle that class's indices (taken in the official training order) and keep
  the first ``n_c``.

The long-tailed subsampling applies to the training split only; the test split
stays the balanced official one.
"""
from __future__ import annotations

import hashlib
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from .import_spec import import_callable

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "DATASET_NAMES",
    "CIFAR_ARCHIVES",
    "lt_class_counts",
    "lt_indices",
    "largest_imbalance_ratio",
    "read_cifar",
    "DatasetSpec",
    "LoadedDataset",
    "load_dataset",
    "normalize",
    "default_data_root",
    "download_cifar",
    "load_user_dataset",
]

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

DATASET_NAMES = ("cifar10", "cifar100", "cifar10-lt", "cifar100-lt")
DATA_ROOT_ENV = "SPECTRA_DATA_ROOT"

# name -> (URL, md5 of the archive, folder inside the archive)
CIFAR_ARCHIVES = {
    "cifar10": (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py",
    ),
    "cifar100": (
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python",
    ),
}
_TRAIN_SIZE_PER_CLASS = {"cifar10": 5000, "cifar100": 500}


# ----------------------------------------------------------------- LT counts
def lt_class_counts(
    num_classes: int,
    n_max: int,
    imbalance_ratio: float,
    profile: Literal["exp", "step"] = "exp",
) -> list[int]:
    """Images per class of a long-tailed set (class 0 is the most frequent).

    ``exp``: ``n_c = int(n_max · r^(c/(C-1)))``, ``r = 1/imbalance_ratio``.
    ``step``: ``n_max`` for the first ``C//2`` classes, ``int(n_max · r)`` after.
    A ratio of 1 gives the balanced counts.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if imbalance_ratio < 1:
        raise ValueError(f"imbalance_ratio must be >= 1, got {imbalance_ratio}")
    r = 1.0 / imbalance_ratio
    if profile == "exp":
        if num_classes == 1:
            return [int(n_max)]
        return [int(n_max * r ** (c / (num_classes - 1.0))) for c in range(num_classes)]
    if profile == "step":
        half = num_classes // 2
        return [int(n_max)] * half + [int(n_max * r)] * (num_classes - half)
    raise ValueError(f"unknown imbalance profile {profile!r}; expected 'exp' or 'step'")


def lt_indices(labels: np.ndarray, counts: Sequence[int], seed: int = 0) -> np.ndarray:
    """Indices (into ``labels``) of the long-tailed subset, reference construction.

    Seeds numpy's global generator with ``seed`` once (as the reference code
    does; the previous global state is restored afterwards), then for class
    ``c = 0, 1, ...`` shuffles ``np.where(labels == c)[0]`` and keeps the first
    ``counts[c]``. The result is class-major: all of class 0 in shuffled order,
    then class 1, and so on (the reference code's order).
    """
    labels = np.asarray(labels)
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        chosen = []
        for c, n_c in enumerate(counts):
            idx = np.where(labels == c)[0]
            if n_c > len(idx):
                raise ValueError(f"class {c} has {len(idx)} images, {n_c} requested")
            np.random.shuffle(idx)
            chosen.append(idx[:n_c])
    finally:
        np.random.set_state(state)
    return np.concatenate(chosen).astype(np.int64) if chosen else np.zeros(0, np.int64)


# ------------------------------------------------------------ pickle reading
def _folder_name(name: str) -> str:
    return CIFAR_ARCHIVES[name][2]


def _resolve_folder(root: str | os.PathLike[str], name: str) -> Path:
    """``root/cifar-10-batches-py`` or ``root`` itself if it is that folder."""
    root = Path(root).expanduser()
    inner = root / _folder_name(name)
    if inner.is_dir():
        return inner
    if root.name == _folder_name(name) and root.is_dir():
        return root
    return inner


def _missing(name: str, path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"{name} not found: {path} does not exist; point --data-root (or ${DATA_ROOT_ENV}) "
        f"at the folder containing '{_folder_name(name)}', or pass --download"
    )


def _not_cifar(path: Path, why: str = "truncated or corrupt?") -> ValueError:
    return ValueError(f"{path} is not a CIFAR batch file ({why})")


def _unpickle(path: Path, name: str, required: Sequence[str] = ()) -> dict[str, Any]:
    """The dict pickled in ``path`` with str keys; ``ValueError`` naming the
    file when it is not a pickled dict holding the ``required`` keys."""
    if not path.is_file():
        raise _missing(name, path)
    try:
        with open(path, "rb") as fh:
            raw = pickle.load(fh, encoding="bytes")
    except OSError:
        raise
    except Exception:  # UnpicklingError, EOFError, ValueError, ...: whatever a damaged pickle raises
        raise _not_cifar(path) from None
    if not isinstance(raw, dict):
        raise _not_cifar(path, f"it holds a {type(raw).__name__}, not a dict")
    # The official files have bytes keys, re-encoded copies may have str keys.
    part = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in raw.items()}
    absent = [key for key in required if key not in part]
    if absent:
        raise _not_cifar(path, f"no {', '.join(repr(k) for k in absent)} entr{'ies' if len(absent) > 1 else 'y'}")
    return part


def _images_and_labels(part: dict[str, Any], label_key: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A batch's images (N, 32, 32, 3) and labels (N,); ``ValueError`` naming
    the file when the rows are not 3072 bytes or the counts differ."""
    try:
        images = _to_nhwc(part["data"])
        labels = np.asarray(part[label_key], dtype=np.int64).reshape(-1)
    except (ValueError, TypeError):
        raise _not_cifar(path, "its data is not rows of 3072 bytes with integer labels") from None
    if len(images) != len(labels):
        raise _not_cifar(path, f"{len(images)} images but {len(labels)} labels")
    return images, labels


def _decode_names(names: Sequence[Any]) -> list[str]:
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _to_nhwc(data: Any) -> np.ndarray:
    # Rows are 3072 bytes: 1024 red, 1024 green, 1024 blue, each row-major 32×32.
    return np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()


def read_cifar(
    root: str | os.PathLike[str],
    name: Literal["cifar10", "cifar100"],
    split: Literal["train", "test"],
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read a CIFAR split from the standard python pickles.

    Returns ``(images uint8 (N, 32, 32, 3), labels int64 (N,), class_names)``
    in the file order (the official order for the original files).
    ``root`` may contain ``cifar-10-batches-py`` / ``cifar-100-python`` or be it.
    A missing folder or file raises ``FileNotFoundError``; a file that is not a
    CIFAR pickle (truncated, corrupt, foreign) raises ``ValueError`` naming it.
    """
    if name not in CIFAR_ARCHIVES:
        raise ValueError(f"unknown CIFAR name {name!r}; expected 'cifar10' or 'cifar100'")
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    folder = _resolve_folder(root, name)
    if not folder.is_dir():
        raise _missing(name, folder)
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key, meta_path, names_key = "labels", folder / "batches.meta", "label_names"
        default_names = list(CIFAR10_CLASSES)
    else:
        files = [split]
        label_key, meta_path, names_key = "fine_labels", folder / "meta", "fine_label_names"
        default_names = [str(i) for i in range(100)]
    parts = [_images_and_labels(_unpickle(folder / f, name, ("data", label_key)), label_key, folder / f) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    names = _decode_names(_unpickle(meta_path, name, (names_key,))[names_key]) if meta_path.is_file() else default_names
    return images, labels, names


# ------------------------------------------------------------- data set spec
@dataclass
class DatasetSpec:
    """What data set to load; JSON-able so checkpoints can describe their data.

    ``name``: cifar10, cifar100 (balanced) or cifar10-lt, cifar100-lt.
    ``imbalance_ratio`` / ``profile`` / ``seed`` only matter for ``-lt`` names
    and the train split; ``max_samples`` (optional) keeps about N samples of
    the resulting split, the first ``max(1, floor(n_c·N/total))`` of each
    class, so every class stays present (for quick tests and dry runs).
    """

    name: str
    root: str | None = None
    split: str = "train"
    imbalance_ratio: float = 100.0
    profile: str = "exp"
    seed: int = 0
    max_samples: int | None = None

    def __post_init__(self) -> None:
        if self.name not in DATASET_NAMES:
            raise ValueError(f"unknown data set {self.name!r}; expected one of {', '.join(DATASET_NAMES)}")
        if self.split not in ("train", "test"):
            raise ValueError(f"unknown split {self.split!r}; expected 'train' or 'test'")
        if self.profile not in ("exp", "step"):
            raise ValueError(f"unknown imbalance profile {self.profile!r}; expected 'exp' or 'step'")
        if self.root is not None:
            self.root = str(self.root)
        self.imbalance_ratio = float(self.imbalance_ratio)
        if not (math.isfinite(self.imbalance_ratio) and self.imbalance_ratio >= 1):
            raise ValueError(f"the imbalance ratio must be a finite number >= 1, got {self.imbalance_ratio}")
        if not 0 <= int(self.seed) < 2 ** 32:
            raise ValueError(f"the long-tail selection seed (--lt-seed) must be in [0, 2**32), got {self.seed}")

    @property
    def base(self) -> str:
        """``cifar10`` or ``cifar100``."""
        return self.name.removesuffix("-lt")

    @property
    def long_tailed(self) -> bool:
        return self.name.endswith("-lt") and self.split == "train"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DatasetSpec":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def with_split(self, split: str) -> "DatasetSpec":
        d = self.to_dict()
        d["split"] = split
        return DatasetSpec.from_dict(d)


@dataclass
class LoadedDataset:
    """A split in memory: ``images`` uint8 (N, 32, 32, 3), ``labels`` int64 (N,),
    ``indices`` into the official split, ``class_counts[c]`` = #images of class c."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    indices: torch.Tensor
    class_counts: list[int] = field(default_factory=list)
    spec: DatasetSpec | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def content_sha256(self) -> str:
        """SHA-256 of the selected images' pixels and labels (uint8 then int64,
        in the selection's order): what the data *is*, unlike the root path, so
        two copies of a data set (e.g. one re-encoded) are told apart."""
        digest = hashlib.sha256(self.images.contiguous().numpy().tobytes())
        digest.update(self.labels.to(torch.int64).contiguous().numpy().tobytes())
        return digest.hexdigest()


def load_dataset(spec: DatasetSpec, every_class: bool = False) -> LoadedDataset:
    """Load the split described by ``spec`` (reads the pickles once).

    ``every_class``: raise ``ValueError`` when the long-tailed selection leaves
    a class without images (an imbalance ratio above ``n_max``, the image count
    of the largest class) instead of returning an empty class (training needs
    every class; analysis skips an empty one).
    """
    root = spec.root if spec.root is not None else default_data_root()
    images, labels, names = read_cifar(root, spec.base, spec.split)  # type: ignore[arg-type]
    num_classes = len(names)
    if spec.long_tailed:
        # The smallest class bounds n_max (class 0 gets n_max); equal to len/C on the official sets.
        n_max = int(np.bincount(labels, minlength=num_classes).min())
        counts = lt_class_counts(num_classes, n_max, spec.imbalance_ratio, spec.profile)  # type: ignore[arg-type]
        if every_class and 0 in counts:
            raise ValueError(_empty_class_message(spec, counts, n_max))
        idx = lt_indices(labels, counts, seed=spec.seed)
    else:
        idx = np.arange(len(labels), dtype=np.int64)
    if spec.max_samples is not None:
        idx = _stratified_prefix(idx, labels[idx], num_classes, int(spec.max_samples))
    sel_labels = labels[idx]
    return LoadedDataset(
        images=torch.from_numpy(images[idx]),
        labels=torch.from_numpy(sel_labels),
        class_names=names,
        indices=torch.from_numpy(idx),
        class_counts=np.bincount(sel_labels, minlength=num_classes).astype(int).tolist(),
        spec=spec,
    )


def largest_imbalance_ratio(n_max: int) -> float:
    """The largest imbalance ratio whose long-tailed counts (either profile)
    give every class at least one of ``n_max`` images: the rarest class gets
    ``int(n_max / ratio)``, so about ``n_max`` (one below it in floating point
    when ``n_max · (1/n_max)`` rounds under 1, e.g. 49). 0 when ``n_max`` is 0."""
    if n_max < 1:
        return 0.0
    ratio = float(n_max)
    while int(n_max * (1.0 / ratio)) < 1:
        ratio = math.nextafter(ratio, 0.0)
    return ratio


def _empty_class_message(spec: DatasetSpec, counts: Sequence[int], n_max: int) -> str:
    empty = counts.index(0)
    if n_max < 1:
        return f"{spec.name} has no {spec.split} images of class {empty}"
    largest = largest_imbalance_ratio(n_max)
    shown = f"{largest:.0f}" if largest.is_integer() else repr(largest)
    return (f"the imbalance ratio {spec.imbalance_ratio:g} leaves class {empty} of {spec.name} without training images "
            f"(n_max {n_max}: the rarest class gets int(n_max/ratio)); the largest allowed is {shown}")


def _stratified_prefix(idx: np.ndarray, labels: np.ndarray, num_classes: int, n: int) -> np.ndarray:
    """Keep about ``n`` of ``idx``: the first ``max(1, floor(n_c · n / N))`` of
    each class (in ``idx`` order), so a small subset keeps every class and the
    long-tailed shape."""
    if n >= len(idx):
        return idx
    counts = np.bincount(labels, minlength=num_classes)
    keep = np.where(counts > 0, np.maximum(1, (counts * n) // max(len(idx), 1)), 0)
    chosen = [idx[labels == c][: keep[c]] for c in range(num_classes)]
    return np.concatenate(chosen)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (or float NHWC in [0, 255]) → float32 NCHW, ``(x/255 − mean)/std``."""
    mean = torch.tensor(CIFAR_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=images.device).view(1, 3, 1, 1)
    x = images.permute(0, 3, 1, 2).float().div(255.0)
    return ((x - mean) / std).contiguous()


# ------------------------------------------------------------- data location
def default_data_root() -> Path:
    """``$SPECTRA_DATA_ROOT`` if set, else ``$XDG_CACHE_HOME/spectra/data``
    (``~/.cache/spectra/data`` by default)."""
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "spectra" / "data"


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_cifar(name: str, root: str | os.PathLike[str] | None = None, timeout: float = 60.0) -> Path:
    """Fetch the official CIFAR archive, check its md5 and extract it under ``root``.

    Returns the extracted folder. Does nothing if the folder already exists.
    Raises ``RuntimeError`` with a one-line message when the download fails
    (e.g. no internet) or the checksum does not match.
    """
    name = name.removesuffix("-lt")
    if name not in CIFAR_ARCHIVES:
        raise ValueError(f"unknown CIFAR name {name!r}; expected 'cifar10' or 'cifar100'")
    url, md5, folder = CIFAR_ARCHIVES[name]
    root = Path(root).expanduser() if root is not None else default_data_root()
    if (root / folder).is_dir():
        return root / folder
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        archive = Path(tmp) / url.rsplit("/", 1)[-1]
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(archive, "wb") as out:
                shutil.copyfileobj(resp, out)
        except (urllib.error.URLError, OSError) as exc:
            raise RuntimeError(
                f"could not download {url} ({exc}); without internet, copy '{folder}' into {root} "
                f"or point --data-root at a folder containing it"
            ) from exc
        got = _md5(archive)
        if got != md5:
            raise RuntimeError(f"checksum mismatch for {url}: md5 {got}, expected {md5}")
        with tarfile.open(archive, "r:gz") as tar:
            # The "data" filter refuses absolute paths and links out of tmp.
            extract_kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, **extract_kwargs)
        os.replace(Path(tmp) / folder, root / folder)
    return root / folder


# ---------------------------------------------------------- user data sets
def load_user_dataset(spec: str, **kwargs: Any) -> Any:
    """Call a user factory ``package.module:function(**kwargs)``.

    The factory must return a ``torch.utils.data.Dataset`` or a pair
    ``(inputs, targets)`` of tensors with the same first dimension; the pair is
    wrapped in a ``TensorDataset``.
    """
    factory = import_callable(spec, "data set", "package.module:function")
    try:
        result = factory(**kwargs)
    except Exception as exc:  # the user's code: say whose error it is, in one line
        lines = str(exc).strip().splitlines()
        raise ValueError(f"the data set factory {spec!r} raised {type(exc).__name__}"
                         + (f": {lines[0]}" if lines else "")) from exc
    if isinstance(result, torch.utils.data.Dataset):
        return result
    if isinstance(result, (tuple, list)) and len(result) == 2 and all(isinstance(t, torch.Tensor) for t in result):
        inputs, targets = result
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(
                f"{spec!r} returned inputs with {inputs.shape[0]} rows but targets with {targets.shape[0]}"
            )
        return torch.utils.data.TensorDataset(inputs, targets)
    raise ValueError(
        f"{spec!r} returned {type(result).__name__}; expected a torch Dataset or an (inputs, targets) tuple of tensors"
    )
