"""HDF5 results store: one self-describing group per analysis result.

Layout (``schema_version`` 1; documented in ``docs/hdf5-schema.md`` and, as a
JSON string, in the file's own root attribute ``schema_doc``)::

    /                  attrs: schema="spectra-results", schema_version, schema_doc, created_utc
    /entries/<key>     one result; attrs = provenance (see PROVENANCE), complete=True
        eigs:    top, bottom, top_residuals, bottom_residuals   (float64 vectors)
        density: nodes, weights (P×m), grid, values (G,)
        trace:   estimate, stderr                              (float64 scalars)

``<key>`` = ``{checkpoint sha256[:16]}_class{c:04d}_{kind}_{settings hash[:16]}``,
so a result is identified by what was analysed and how; a rerun with the same
settings finds its key and skips the work. A byte-identical checkpoint met in
another run folder while the stored entry's own file still holds those bytes
(a run started from a copy of another's checkpoint) is not recomputed: its run
gets a copy of the entry, with that file's path, run and epoch, under
``<key>_in{folder hash[:8]}`` and ``alias_of = <key>`` (:func:`alias_record`),
so every run shows the epoch. A folder that was moved or comes from another
machine (the stored file is gone) is the same run: nothing is copied.

Crash safety. An entry is written under ``/entries/.tmp-<key>``, flushed, then
renamed to its key and flushed again; the file is open only while an entry is
committed (never during the computation), so a killed writer leaves a
readable file with whole entries, and at most a ``.tmp-*`` group that readers
ignore and the next writer deletes. One writer at a time: an exclusive
``fcntl.flock`` on the sidecar ``<file>.lock`` (which records the holder's
pid) refuses a second writer with :class:`StoreLockedError`.

Readers (``read_results``, ``read_provenances``) need only h5py and return
numpy arrays. They take one file or several read as one (:data:`ResultsFiles`):
e.g. the ``results.h5`` that ``--spectra-every`` writes in each run folder.
Questions asked of the entries (which runs, λmax/λmin per class over epochs,
one density) are answered by :mod:`spectra.results_query`.
"""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import functools
import hashlib
import json
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import h5py
import numpy as np

from spectra.checkpoints import file_sha256, first_line

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "PROVENANCE",
    "RESULT_DATASETS",
    "RESULT_ATTRIBUTES",
    "StoreError",
    "StoreLockedError",
    "StoreWarning",
    "ResultRecord",
    "ResultsFiles",
    "describe_files",
    "entry_key",
    "ResultsWriter",
    "read_results",
    "read_provenances",
    "stored_keys",
    "file_attributes",
    "schema_doc",
]

SCHEMA = "spectra-results"
SCHEMA_VERSION = 1
ENTRIES = "entries"
_TMP_PREFIX = ".tmp-"

# Provenance attributes of every entry: name -> meaning. Attributes listed in
# _JSON_ATTRS hold JSON text (HDF5 attributes cannot hold nested mappings).
PROVENANCE: dict[str, str] = {
    "kind": "analysis: 'eigs' (extreme eigenvalues), 'density' (spectral density, SLQ) or 'trace'",
    "settings_hash": "SHA-256 of the canonical JSON of everything besides checkpoint and class that "
                     "determines the result (kind, algorithm and its parameters, seed, dtype, loss, parameter "
                     "selection, data set identity without its local root, the data's content hash data_sha256, "
                     "per-class sample cap)",
    "checkpoint_path": "absolute path of the checkpoint file when analysed",
    "checkpoint_sha256": "SHA-256 of the checkpoint file's bytes",
    "checkpoint_format": "spectra | reference | state_dict | torchscript | pickled-module",
    "epoch": "completed training epochs of the checkpoint (-1 if unknown)",
    "run": "name of the folder holding the checkpoint (groups the epochs of one training run)",
    "method": "training method recorded in the checkpoint ('' if unknown)",
    "model": "architecture name (built-in name or package.module:Class)",
    "model_kwargs": "JSON: keyword arguments the architecture was built with",
    "dataset": "JSON: data set spec (spectra.datasets.DatasetSpec dict, or {'factory': 'pkg.mod:func'})",
    "split": "data split the Hessian was computed on ('train' or 'test')",
    "class_index": "class whose samples define the Hessian",
    "class_name": "name of that class",
    "num_samples": "number of samples of that class used",
    "sample_indices_sha256": "SHA-256 of the samples' indices into the split (int64 little-endian)",
    "data_sha256": "SHA-256 of the split's samples (built-in sets: the selected images' uint8 pixels, then their "
                   "int64 labels, as a training run's summary.json train_data_sha256 / test_data_sha256; a "
                   "TensorDataset: dtype, shape and bytes of inputs and labels); '' where not hashed (other "
                   "factory data sets); absent in entries written before 2026-11-29",
    "class_counts": "JSON: samples per class in the split (before --max-samples)",
    "loss_fn": "loss whose Hessian is analysed ('ce' = mean cross-entropy; 'ldam' / 'vs' = mean LDAM / VS loss)",
    "loss": "value of that mean loss over the class samples at the checkpoint",
    "algorithm": "lanczos (eigs) | slq (density) | hutch++ / hutchinson (trace)",
    "algorithm_params": "JSON: parameters of the algorithm (k, tol, max_iter / probes, steps / ...)",
    "params": "JSON: parameter-name patterns the Hessian is restricted to (null = all trainable)",
    "num_params": "dimension of the Hessian (number of scalar parameters)",
    "hvp_method": "how Hessian-vector products were formed (forward-over-reverse | double-backward)",
    "kept_graph": "whether the double-backward gradient graph was kept between products",
    "cuda_graphs": "whether the products were replayed as CUDA graphs",
    "seed": "random seed of the algorithm",
    "dtype": "floating-point type of the Hessian-vector products",
    "device": "device the products ran on",
    "num_matvecs": "Hessian-vector products spent",
    "spectra_version": "spectra version that computed the entry",
    "torch_version": "torch version that computed the entry",
    "wall_time_s": "wall-clock seconds of the computation",
    "created_utc": "ISO-8601 time the entry was written",
    "alias_of": "only on copies: key of the entry this one repeats for a byte-identical checkpoint in another "
                "run folder (checkpoint_path, run and epoch are this copy's)",
    "complete": "True once the entry is whole (set before the atomic rename)",
}
# Attributes that only some kinds carry.
RESULT_ATTRIBUTES: dict[str, dict[str, str]] = {
    "eigs": {"converged": "every residual <= tol · max|Ritz value|", "tol": "relative residual tolerance"},
    "density": {"sigma": "standard deviation of the Gaussian kernel that smooths the quadrature"},
    "trace": {"trace_method": "hutch++ or hutchinson"},
}
_JSON_ATTRS = frozenset({"model_kwargs", "dataset", "class_counts", "algorithm_params", "params"})

RESULT_DATASETS: dict[str, dict[str, str]] = {
    "eigs": {
        "top": "largest eigenvalues, descending",
        "bottom": "smallest eigenvalues, ascending",
        "top_residuals": "||Hv - λv|| of each top eigenpair",
        "bottom_residuals": "||Hv - λv|| of each bottom eigenpair",
    },
    "density": {
        "nodes": "Ritz values per probe (P × m), the quadrature nodes",
        "weights": "quadrature weights per probe (P × m); each row sums to 1",
        "grid": "points where the smoothed density is evaluated",
        "values": "smoothed density on the grid (integrates to 1)",
    },
    "trace": {
        "estimate": "trace estimate",
        "stderr": "standard error of the estimate",
    },
}


def schema_doc() -> dict[str, Any]:
    """The schema as a JSON-able dict (stored in the root attribute ``schema_doc``)."""
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "layout": "/entries/<key>: one group per result; key = "
                  "{checkpoint_sha256[:16]}_class{class_index:04d}_{kind}_{settings_hash[:16]}, with the suffix "
                  "_in{sha256 of the checkpoint's folder[:8]} on copies (attribute alias_of); "
                  "groups named .tmp-* are uncommitted and must be ignored",
        "entry_attributes": PROVENANCE,
        "json_attributes": sorted(_JSON_ATTRS),
        "entry_datasets": RESULT_DATASETS,
        "entry_kind_attributes": RESULT_ATTRIBUTES,
        "docs": "docs/hdf5-schema.md",
    }


class StoreError(Exception):
    """A results file cannot be read or written; the message is one line."""


class StoreLockedError(StoreError):
    """Another process holds the writer lock."""


class StoreWarning(UserWarning):
    """A damaged entry of a results file was skipped; the message is one line naming file and entry."""


@dataclass
class ResultRecord:
    """One stored result: provenance attributes and result arrays."""

    provenance: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def key(self) -> str:
        p = self.provenance
        key = entry_key(p["checkpoint_sha256"], int(p["class_index"]), p["kind"], p["settings_hash"])
        return alias_key(key, _folder_of(p)) if p.get("alias_of") else key

    @property
    def kind(self) -> str:
        return str(self.provenance["kind"])

    @property
    def epoch(self) -> int:
        return int(self.provenance.get("epoch", -1))

    @property
    def class_index(self) -> int:
        return int(self.provenance["class_index"])

    @property
    def run(self) -> str:
        return str(self.provenance.get("run", ""))

    @property
    def run_folder(self) -> str:
        """Folder of the analysed checkpoint ('' when the entry does not record its path)."""
        return _folder_of(self.provenance)

    @property
    def run_key(self) -> tuple[str, str]:
        """(run name, run folder): what identifies the training run of the entry."""
        return self.run, self.run_folder


def _folder_of(provenance: dict[str, Any]) -> str:
    path = str(provenance.get("checkpoint_path", "") or "")
    return os.path.dirname(path) if path else ""


def entry_key(checkpoint_sha256: str, class_index: int, kind: str, settings_hash: str) -> str:
    """Name of an entry's group: what was analysed and with which settings."""
    return f"{checkpoint_sha256[:16]}_class{int(class_index):04d}_{kind}_{settings_hash[:16]}"


def _origin(provenance: dict[str, Any]) -> tuple[str, str]:
    return str(provenance.get("checkpoint_path", "") or ""), str(provenance.get("checkpoint_sha256", ""))


@functools.lru_cache(maxsize=256)
def _sha_of(path: str, mtime_ns: int, size: int) -> str:
    return file_sha256(path)


def _holds(path: str, sha: str) -> bool:
    """Whether the file at ``path`` exists and has SHA-256 ``sha`` (hashed once per file version)."""
    try:
        st = os.stat(path)
        return os.path.isfile(path) and _sha_of(path, st.st_mtime_ns, st.st_size) == sha
    except OSError:
        return False


def alias_key(key: str, folder: str) -> str:
    """Key of the copy of entry ``key`` for the checkpoint's twin in ``folder`` (absolute, resolved)."""
    return f"{key}_in{hashlib.sha256(folder.encode()).hexdigest()[:8]}"


def alias_record(stored: ResultRecord, checkpoint_path: str, run: str, epoch: int) -> ResultRecord:
    """The copy of ``stored`` for a byte-identical checkpoint at ``checkpoint_path``
    (absolute) in another folder, of training run ``run`` at ``epoch``."""
    provenance = dict(stored.provenance, checkpoint_path=checkpoint_path, run=run, epoch=int(epoch),
                      alias_of=stored.provenance.get("alias_of") or stored.key)
    provenance.pop("created_utc", None)
    return ResultRecord(provenance=provenance, arrays=dict(stored.arrays))


# ------------------------------------------------------------------ decoding
def _to_python(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _encode_attr(name: str, value: Any) -> Any:
    if name in _JSON_ATTRS:
        return json.dumps(value, sort_keys=True)
    if value is None:
        return ""
    if isinstance(value, str):
        return str(value)  # plain str: subclasses (torch.__version__) confuse h5py
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    return value


def _decode_attrs(attrs: h5py.AttributeManager) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in attrs.items():
        value = _to_python(raw)
        if name in _JSON_ATTRS and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        out[name] = value
    return out


# ------------------------------------------------------------------ opening
def _check_schema(f: h5py.File, path: Path) -> None:
    try:
        schema = _to_python(f.attrs.get("schema"))
        raw_version = _to_python(f.attrs.get("schema_version", 0))
    except (OSError, KeyError, RuntimeError) as exc:  # h5py's errors on damaged metadata
        raise StoreError(f"cannot read {path}: {first_line(exc)}") from exc
    if schema != SCHEMA:
        raise StoreError(f"{path} is an HDF5 file but not a spectra results file (no schema='{SCHEMA}' attribute)")
    try:
        version = int(raw_version)
    except (TypeError, ValueError):
        raise StoreError(f"{path} is damaged: its schema_version {raw_version!r} is not an integer") from None
    if version > SCHEMA_VERSION:
        raise StoreError(f"{path} uses results schema version {version}; this spectra reads up to {SCHEMA_VERSION}")


def _schema_doc_text() -> str:
    return json.dumps(schema_doc(), sort_keys=True)


def _refresh_schema_doc(f: h5py.File) -> None:
    """Rewrite an appended file's ``schema_doc`` when this version describes the schema in
    other words (same ``schema_version``, so old entries stay valid): the doc must describe the
    entries this writer adds, e.g. attributes documented after the file was made."""
    current = _schema_doc_text()
    try:
        stored = _to_python(f.attrs.get("schema_doc"))
    except _H5_ERRORS:
        stored = None
    if stored != current:
        f.attrs["schema_doc"] = current


@contextmanager
def _open_for_reading(path: str | os.PathLike[str]) -> Iterator[h5py.File]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    if not h5py.is_hdf5(path):
        raise StoreError(f"{path} is not an HDF5 file")
    try:
        # No HDF5 file lock for readers: the single writer only ever adds
        # whole entries and readers skip uncommitted ones.
        f = h5py.File(path, "r", locking=False)
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {str(exc).splitlines()[0]}") from exc
    with f:
        _check_schema(f, path)
        yield f


# What a committed entry must hold to be read: these attributes, and its kind's datasets.
_REQUIRED_ATTRS = ("kind", "class_index", "checkpoint_sha256", "settings_hash")
# h5py's read failures on a damaged file (OSError: "filter returned failure", bad
# object headers; KeyError/RuntimeError: broken links and B-trees).
_H5_ERRORS = (OSError, KeyError, RuntimeError, ValueError, TypeError)
OnDamage = Callable[[str, str], None]


def _entries_group(f: h5py.File, path: Path) -> h5py.Group | None:
    """``/entries`` (None when absent); ``StoreError`` when it is not a readable group."""
    try:
        if ENTRIES not in f:
            return None
        entries = f[ENTRIES]
    except _H5_ERRORS as exc:
        raise StoreError(f"{path} is damaged: /{ENTRIES} cannot be read ({first_line(exc)})") from exc
    if not isinstance(entries, h5py.Group):
        raise StoreError(f"{path} is damaged: /{ENTRIES} is a {type(entries).__name__.lower()}, not a group")
    return entries


def _entry_damage(group: Any, provenance: dict[str, Any]) -> str | None:
    """Why a committed entry cannot be read (None: it is whole)."""
    if not isinstance(group, h5py.Group):
        return "a dangling or unreadable link" if group is None else f"a {type(group).__name__.lower()}, not a group"
    missing = [a for a in _REQUIRED_ATTRS if a not in provenance]
    if missing:
        return f"no {', '.join(missing)} attribute"
    kind = provenance["kind"]
    if kind not in RESULT_DATASETS:
        return f"unknown kind {kind!r}"
    try:
        int(provenance["class_index"]), int(provenance.get("epoch", -1))
    except (TypeError, ValueError):
        return "class_index or epoch is not an integer"
    absent = [d for d in RESULT_DATASETS[kind] if not isinstance(group.get(d), h5py.Dataset)]
    return f"no {', '.join(absent)} dataset" if absent else None


def _committed(f: h5py.File, path: Path, on_damage: OnDamage) -> Iterator[tuple[str, h5py.Group, dict[str, Any]]]:
    """(name, group, decoded attributes) of every committed, whole entry.

    Uncommitted ``.tmp-*`` groups are skipped silently; a damaged entry (a dangling
    link or dataset where a group belongs, missing attributes or datasets, metadata
    HDF5 cannot read) goes to ``on_damage(name, reason)`` and is skipped.
    """
    entries = _entries_group(f, path)
    if entries is None:
        return
    try:
        names = list(entries)
    except _H5_ERRORS as exc:
        raise StoreError(f"{path} is damaged: its entries cannot be listed ({first_line(exc)})") from exc
    for name in names:
        if name.startswith(_TMP_PREFIX):
            continue
        try:
            group = entries.get(name)  # None for a dangling link
            if isinstance(group, h5py.Group) and not bool(group.attrs.get("complete", False)):
                continue
            provenance = _decode_attrs(group.attrs) if isinstance(group, h5py.Group) else {}
            damage = _entry_damage(group, provenance)
        except _H5_ERRORS as exc:
            damage = f"unreadable ({first_line(exc)})"
        if damage:
            on_damage(name, damage)
            continue
        yield name, group, provenance


def _skip_damaged(path: Path) -> OnDamage:
    """Readers: one :class:`StoreWarning` per damaged entry, the intact ones stay readable."""
    def warn(name: str, reason: str) -> None:
        warnings.warn(f"{path}: skipping damaged entry {name}: {reason}", StoreWarning, stacklevel=4)
    return warn


def _refuse_damaged(path: Path) -> OnDamage:
    """Writers: a damaged file is not extended (its damage could spread or hide)."""
    def refuse(name: str, reason: str) -> None:
        raise StoreError(f"{path} is damaged (entry {name}: {reason}); refusing to write to it")
    return refuse


# ------------------------------------------------------------------ writing
class ResultsWriter:
    """The one writer of a results file; use as a context manager.

    >>> with ResultsWriter("results.h5") as w:        # doctest: +SKIP
    ...     if not w.has(key): w.write(record)

    The constructor takes the writer lock (or raises :class:`StoreLockedError`),
    creates the file with its schema attributes if needed (refusing foreign
    files), deletes uncommitted ``.tmp-*`` groups left by a killed writer and
    remembers the committed keys.
    """

    def __init__(self, path: str | os.PathLike[str], open_retry_s: float = 30.0) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.open_retry_s = open_retry_s
        self._lock_fd: int | None = None
        # Committed key -> (checkpoint_path, checkpoint_sha256): skips and copies are decided without reading the file
        self._origins: dict[str, tuple[str, str]] = {}
        self._refuse_foreign_file()  # before the lock: a refused file gets no sidecar beside it
        self._acquire_lock()
        try:
            self._prepare_file()
        except BaseException:
            self.close()
            raise

    def _refuse_foreign_file(self) -> None:
        """Refuse a path holding something other than a spectra results file (checked again under
        the lock; an HDF5 file another program holds open is left to that check)."""
        if not self.path.exists():
            return
        self._refuse_non_hdf5()
        try:
            f = h5py.File(self.path, "r")
        except OSError:
            return
        with f:
            _check_schema(f, self.path)

    def _refuse_non_hdf5(self) -> None:
        if not self.path.is_file() or not h5py.is_hdf5(self.path):
            raise StoreError(f"{self.path} exists and is not an HDF5 file; refusing to overwrite it")

    # -- locking
    def _acquire_lock(self) -> None:
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot write results file {self.path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreLockedError(
                    f"{self.path} is being written by another process (pid {holder})"
                ) from exc
            raise StoreError(f"cannot lock {self.lock_path}: {exc.strerror or exc}") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._lock_fd = fd

    def close(self) -> None:
        """Release the writer lock (the sidecar file stays: deleting it would race)."""
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "ResultsWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- file access
    def _open(self) -> h5py.File:
        """Open for writing, waiting out short-lived HDF5 locks of other tools."""
        deadline = time.monotonic() + self.open_retry_s
        while True:
            try:
                return h5py.File(self.path, "a")
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreError(f"cannot open {self.path}: it stays locked by another HDF5 program")
                time.sleep(0.2)
            except OSError as exc:
                raise StoreError(f"cannot write results file {self.path}: {str(exc).splitlines()[0]}") from exc

    def _prepare_file(self) -> None:
        if self.path.exists():
            self._refuse_non_hdf5()
            with self._open() as f:
                _check_schema(f, self.path)
                _refresh_schema_doc(f)
                try:
                    self._origins = {name: _origin(provenance)
                                     for name, _, provenance in _committed(f, self.path, _refuse_damaged(self.path))}
                    entries = _entries_group(f, self.path)
                    for name in [n for n in (entries or []) if n.startswith(_TMP_PREFIX)]:
                        del entries[name]  # left by a killed writer
                except StoreError:
                    raise
                except _H5_ERRORS as exc:
                    raise StoreError(f"{self.path} is damaged ({first_line(exc)}); refusing to write to it") from exc
            return
        with self._open() as f:
            f.attrs["schema"] = SCHEMA
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["schema_doc"] = _schema_doc_text()
            f.attrs["created_utc"] = _utc_now()
            f.require_group(ENTRIES)

    # -- entries
    def has(self, key: str) -> bool:
        """True if a committed entry named ``key`` exists."""
        return key in self._origins

    @property
    def keys(self) -> set[str]:
        return set(self._origins)

    def read(self, key: str) -> ResultRecord | None:
        """The committed entry named ``key`` (None when there is none)."""
        if key not in self._origins:
            return None
        with self._open() as f:
            group = f[ENTRIES][key]
            return _read_group(group, _decode_attrs(group.attrs))

    def stored_for(self, key: str, checkpoint_path: str, run: str, epoch: int) -> str | None:
        """Whether the job of entry ``key`` for the checkpoint at ``checkpoint_path``
        is done: None (not stored), ``"stored"``, or ``"copied"`` — the entry
        describes a byte-identical checkpoint in another folder that still holds
        it, and the run of ``checkpoint_path`` has just got its copy
        (:func:`alias_record`)."""
        if key not in self._origins:
            return None
        path = os.path.abspath(checkpoint_path)
        folder = os.path.dirname(path)
        if self._twin_elsewhere(key, folder) and not self.has(alias_key(key, folder)):
            self.write(alias_record(self.read(key), path, run, epoch))
            return "copied"
        return "stored"

    def _twin_elsewhere(self, key: str, folder: str) -> bool:
        """Entry ``key`` describes a file outside ``folder`` that still holds its bytes."""
        path, sha = self._origins.get(key, ("", ""))
        return bool(path) and os.path.dirname(path) != folder and _holds(path, sha)

    def write(self, record: ResultRecord) -> str:
        """Commit ``record`` whole (temporary group → flush → rename); returns its key.

        An existing entry with the same key is replaced (same inputs, same
        settings), unless it describes a byte-identical checkpoint that another
        folder still holds: the record is then stored beside it as that run's
        copy (``alias_of``, :func:`alias_key`).
        """
        if self._lock_fd is None:
            raise StoreError(f"writer of {self.path} is closed")
        key = record.key
        # Another run's entry under this key (a byte-identical checkpoint it still holds): keep it, store a copy.
        if not record.provenance.get("alias_of") and self._twin_elsewhere(key, record.run_folder):
            record = ResultRecord(dict(record.provenance, alias_of=key), record.arrays)
            key = record.key
        tmp = f"{_TMP_PREFIX}{key}"
        with self._open() as f:
            entries = f.require_group(ENTRIES)
            if tmp in entries:
                del entries[tmp]
            group = entries.create_group(tmp)
            for name, value in record.provenance.items():
                if name != "complete":
                    group.attrs[name] = _encode_attr(name, value)
            group.attrs.setdefault("created_utc", _utc_now())
            for name, array in record.arrays.items():
                array = np.asarray(array)
                # Density grids/values (10⁴ points) dominate the file: compress them.
                packed = {"compression": "gzip", "shuffle": True} if array.size > 256 else {}
                group.create_dataset(name, data=array, **packed)
            group.attrs["complete"] = True
            f.flush()
            if key in entries:
                del entries[key]
            f.move(f"{ENTRIES}/{tmp}", f"{ENTRIES}/{key}")
            f.flush()
        self._origins[key] = _origin(record.provenance)
        return key


def _utc_now() -> str:
    # microseconds: "newest wins" must order entries written within one second
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


# ------------------------------------------------------------------ reading
# Readers take one results file or several, read as one store: the training
# runs of several files (e.g. each run folder's own results.h5 of
# ``--spectra-every``) are grouped and labelled together, and where one
# (run, epoch, class) is in two files the newest entry wins, as within a file.
ResultsFiles = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def _paths(results: ResultsFiles) -> list[Path]:
    """The files of ``results`` (one path or several), each once, in the order given."""
    if isinstance(results, (str, os.PathLike)):
        return [Path(results)]
    unique: dict[str, Path] = {}
    for item in results:
        unique.setdefault(os.path.realpath(item), Path(item))
    if not unique:
        raise ValueError("no results file given")
    return list(unique.values())


def describe_files(results: ResultsFiles) -> str:
    """How messages name ``results``: the file, or the files (each once) joined by '+'."""
    return " + ".join(str(p) for p in _paths(results))


def _read_group(group: h5py.Group, provenance: dict[str, Any]) -> ResultRecord:
    arrays = {name: np.asarray(ds[()]) for name, ds in group.items() if isinstance(ds, h5py.Dataset)}
    return ResultRecord(provenance=provenance, arrays=arrays)


def _read_entries(f: h5py.File, path: Path, kind: str | None) -> list[ResultRecord]:
    """The whole committed entries (of ``kind``); damaged ones are skipped with a warning."""
    on_damage = _skip_damaged(path)
    records = []
    for name, group, provenance in _committed(f, path, on_damage):
        if kind is not None and provenance["kind"] != kind:
            continue
        try:
            records.append(_read_group(group, provenance))
        except _H5_ERRORS as exc:  # e.g. a corrupted compressed chunk
            on_damage(name, f"unreadable ({first_line(exc)})")
    return records


def read_results(path: ResultsFiles, kind: str | None = None) -> list[ResultRecord]:
    """All committed entries (optionally of one ``kind``) of one results file or
    several, sorted by run, epoch, class, kind, creation time.

    A damaged entry (see :func:`_committed`, or data HDF5 cannot read) is skipped
    with one :class:`StoreWarning` naming the file and the entry.
    """
    records = []
    for file in _paths(path):
        with _open_for_reading(file) as f:
            records += _read_entries(f, file, kind)
    records.sort(key=lambda r: (r.run, r.run_folder, r.epoch, r.class_index, r.kind,
                                str(r.provenance.get("created_utc", ""))))
    return records


def file_attributes(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The root attributes of a results file (``schema_version``, ``created_utc``, ...), decoded."""
    with _open_for_reading(path) as f:
        try:
            return {name: _to_python(value) for name, value in f.attrs.items()}
        except _H5_ERRORS as exc:
            raise StoreError(f"cannot read {path}: {first_line(exc)}") from exc


def read_provenances(path: ResultsFiles) -> list[dict[str, Any]]:
    """The provenance attributes of every committed entry of one results file or
    several, in no particular order. Arrays are not read, so an entry whose data
    alone is damaged is listed; one with broken structure or attributes is skipped
    with a :class:`StoreWarning`, as by :func:`read_results`."""
    provenances = []
    for file in _paths(path):
        with _open_for_reading(file) as f:
            provenances += [p for _, _, p in _committed(f, file, _skip_damaged(file))]
    return provenances


def stored_keys(path: str | os.PathLike[str]) -> set[str]:
    """Keys of the committed entries."""
    with _open_for_reading(path) as f:
        return {name for name, _, _ in _committed(f, Path(path), _skip_damaged(Path(path)))}
