"""Questions asked of a results store: its training runs, each class's λmax and
λmin over epochs, one density entry, the eigs entry of the same Hessian.

Runs. A training run is the folder that holds its checkpoints: entries are
grouped by (``run`` name, folder of ``checkpoint_path``), so two folders with
the same name (``seedA/ce-drw``, ``seedB/ce-drw``) stay two runs. Each run
gets a display label unique within the file (its name, or the shortest tail of
its folder path that tells it apart); queries take a label, a tail of the
folder path, the full folder path or an unambiguous name (:func:`find_run`).

Every query takes one results file or several read as one
(:data:`spectra.store.ResultsFiles`); where one (run, epoch, class) was
analysed several times the newest entry wins. Only h5py and numpy are needed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np

from spectra.store import ResultRecord, ResultsFiles, describe_files, read_provenances, read_results

__all__ = [
    "Run",
    "EigenSeries",
    "runs",
    "list_runs",
    "find_run",
    "run_of",
    "class_names",
    "class_sizes",
    "eigen_table",
    "eigen_table_of",
    "newest_eigs_entries",
    "lambda_extremes",
    "settings_differences",
    "SETTINGS_FIELDS",
    "same_hessian_eigs",
    "HESSIAN_IDENTITY",
    "density_record",
]


@dataclass(frozen=True)
class Run:
    """One training run of a results file: its name, its checkpoints' folder and
    a label unique within the file (the name unless another folder shares it)."""

    name: str
    folder: str
    label: str

    @property
    def key(self) -> tuple[str, str]:
        return self.name, self.folder


class EigenSeries(NamedTuple):
    """λmax and λmin of one class over epochs (sorted by epoch); NaN where the
    entry holds no such end (stored with top-k 0 or bottom-k 0)."""

    epochs: np.ndarray
    lambda_max: np.ndarray
    lambda_min: np.ndarray


def _label_runs(keys: set[tuple[str, str]]) -> dict[tuple[str, str], Run]:
    """A unique label per (name, folder): the name when no other folder shares it,
    else the shortest tail of the folder path (at least parent/name) that differs."""
    by_name: dict[str, list[str]] = {}
    for name, folder in sorted(keys):
        by_name.setdefault(name, []).append(folder)
    out: dict[tuple[str, str], Run] = {}
    for name, folders in by_name.items():
        if len(folders) == 1:
            out[(name, folders[0])] = Run(name, folders[0], name)
            continue
        parts = {folder: Path(folder).parts if folder else (name,) for folder in folders}
        depth = 2
        while depth < max(len(p) for p in parts.values()) and \
                len({p[-depth:] for p in parts.values()}) < len(parts):
            depth += 1
        for folder, p in parts.items():
            label = "/".join(p[-depth:]).replace("//", "/") if folder else f"{name} (no checkpoint path)"
            out[(name, folder)] = Run(name, folder, label)
    return out


def _run_index(path: ResultsFiles) -> dict[tuple[str, str], Run]:
    """(name, folder) → :class:`Run` over every committed entry (attributes only)."""
    return _label_runs({ResultRecord(provenance=p).run_key for p in read_provenances(path)})


def list_runs(path: ResultsFiles) -> list[Run]:
    """The training runs of a file (all kinds), sorted by label."""
    return sorted(_run_index(path).values(), key=lambda r: r.label)


def run_of(path: ResultsFiles, record: ResultRecord) -> Run:
    """The run (with its file-wide label) that ``record`` belongs to."""
    return _run_index(path)[record.run_key]


def runs(path: ResultsFiles, kind: str | None = None) -> list[str]:
    """Labels of the training runs (checkpoint folders) present, sorted; with
    ``kind``, only the runs that hold entries of that kind."""
    index = _run_index(path)
    keys = {r.run_key for r in read_results(path, kind=kind)} if kind else set(index)
    return sorted(index[k].label for k in keys)


def find_run(path: ResultsFiles, run: "str | Run") -> Run:
    """The run named by ``run``: its label, its folder path (absolute, or any tail
    of it such as ``seedA/ce-drw``) or its name when only one folder has it.

    Raises ``ValueError`` (one line) when nothing or several runs match.
    """
    index = _run_index(path)
    if isinstance(run, Run):
        if run.key not in index:
            raise ValueError(f"run {run.label!r} not in {describe_files(path)}")
        return index[run.key]
    spec = str(run).rstrip("/") or str(run)
    labels = ", ".join(sorted(r.label for r in index.values())) or "none"
    exact = [r for r in index.values() if r.label == spec]
    if exact:
        return exact[0]
    wanted = Path(spec).parts
    matches = [r for r in index.values()
               if r.name == spec or (r.folder and wanted and Path(r.folder).parts[-len(wanted):] == wanted)]
    if not matches and Path(spec).expanduser().exists():
        resolved = str(Path(spec).expanduser().resolve())
        matches = [r for r in index.values() if r.folder == resolved]
    if len(matches) > 1:
        choices = ", ".join(sorted(r.label for r in matches))
        raise ValueError(f"run {spec!r} is ambiguous in {describe_files(path)}: it matches {choices}; give one of those")
    if not matches:
        raise ValueError(f"run {spec!r} not in {describe_files(path)}; runs: {labels}")
    return matches[0]


def class_names(path: ResultsFiles) -> dict[int, str]:
    """Class index → class name, over all entries."""
    return {r.class_index: str(r.provenance.get("class_name", r.class_index)) for r in read_results(path)}


def class_sizes(path: ResultsFiles) -> dict[int, int]:
    """Class index → number of training samples of the class in its data set
    (the recorded ``class_counts``; the analysed ``num_samples`` where the entry
    has no counts, e.g. a user data-set factory)."""
    sizes: dict[int, int] = {}
    for r in read_results(path):
        counts = r.provenance.get("class_counts")
        counts = json.loads(counts) if isinstance(counts, str) else counts
        if counts is not None and len(counts) > r.class_index:
            sizes[r.class_index] = int(counts[r.class_index])
        else:
            sizes.setdefault(r.class_index, int(r.provenance.get("num_samples", 0)))
    return sizes


def _one_run(records: list[ResultRecord], path: ResultsFiles, what: str) -> list[ResultRecord]:
    """``records`` when they all belong to one run, else a one-line ``ValueError``."""
    keys = {r.run_key for r in records}
    if len(keys) > 1:
        index = _run_index(path)
        names = ", ".join(sorted(index[k].label for k in keys))
        raise ValueError(f"{describe_files(path)} holds {what} of several runs ({names}); choose one (run=... / --run)")
    return records


def _of_run(records: list[ResultRecord], run: "str | Run", path: ResultsFiles,
            what: str) -> list[ResultRecord]:
    """The ``records`` of the run named by ``run`` (see :func:`find_run`)."""
    chosen = find_run(path, run)
    selected = [r for r in records if r.run_key == chosen.key]
    if not selected:
        index = _run_index(path)
        having = ", ".join(sorted({index[r.run_key].label for r in records})) or "none"
        raise ValueError(f"run {chosen.label!r} has no {what} in {describe_files(path)}; runs with {what}: {having}")
    return selected


def _first_or_nan(values: np.ndarray) -> float:
    """``values[0]``, or NaN for an empty end (an eigs entry stored with k = 0)."""
    return float(values[0]) if len(values) else float("nan")


def lambda_extremes(record: ResultRecord) -> tuple[float, float]:
    """``(λmin, λmax)`` of an eigs entry: ``bottom[0]`` and ``top[0]``, NaN for an end stored with k = 0."""
    return _first_or_nan(record.arrays["bottom"]), _first_or_nan(record.arrays["top"])


def eigen_table(path: ResultsFiles, run: "str | Run | None" = None) -> dict[int, EigenSeries]:
    """Per class, λmax and λmin over epochs: ``{class: (epochs, lambda_max, lambda_min)}``.

    Uses the ``eigs`` entries of one run (required when the file holds several;
    see :func:`find_run` for how to name it); when one (class, epoch) was
    analysed several times the newest entry wins (entries of two different checkpoints
    at one epoch raise ``ValueError``). λmax = ``top[0]`` and
    λmin = ``bottom[0]``; an entry stored with top-k 0 (bottom-k 0) gives NaN.
    """
    return eigen_table_of(newest_eigs_entries(path, run))


def eigen_table_of(newest: dict[tuple[int, int], ResultRecord]) -> dict[int, EigenSeries]:
    """:func:`eigen_table` from the entries :func:`newest_eigs_entries` chose (no second read)."""
    table: dict[int, EigenSeries] = {}
    for c in sorted({c for c, _ in newest}):
        rows = sorted(((e, r) for (cc, e), r in newest.items() if cc == c), key=lambda row: row[0])
        table[c] = EigenSeries(
            epochs=np.array([e for e, _ in rows], dtype=np.int64),
            lambda_max=np.array([lambda_extremes(r)[1] for _, r in rows], dtype=np.float64),
            lambda_min=np.array([lambda_extremes(r)[0] for _, r in rows], dtype=np.float64),
        )
    return table


def newest_eigs_entries(path: ResultsFiles, run: "str | Run | None" = None) -> dict[tuple[int, int], ResultRecord]:
    """The ``eigs`` entry each point of :func:`eigen_table` comes from: ``{(class, epoch): record}``."""
    records = read_results(path, kind="eigs")
    if not records:
        raise ValueError(f"{describe_files(path)} holds no eigenvalue (eigs) entries")
    what = "eigenvalue (eigs) entries"
    records = _one_run(records, path, what) if run is None else _of_run(records, run, path, what)
    newest: dict[tuple[int, int], ResultRecord] = {}
    for r in records:  # sorted by creation time within (run, epoch, class)
        _refuse_two_checkpoints(newest.get((r.class_index, r.epoch)), r, path)
        newest[(r.class_index, r.epoch)] = r
    return newest


# Provenance that the settings hash covers, by the name a user knows it by (for messages).
SETTINGS_FIELDS = ("split", "dataset", "data_sha256", "algorithm_params", "seed", "dtype", "loss_fn", "params")


def settings_differences(records: Iterable[ResultRecord]) -> list[str]:
    """Where entries computed with different settings (``settings_hash``) differ: the fields of
    :data:`SETTINGS_FIELDS` with several values, plus the per-class sample cap when only it
    differs (``['split', ...]``; empty when all share one settings hash)."""
    records = list(records)
    if len({r.provenance.get("settings_hash") for r in records}) < 2:
        return []
    differ = [f for f in SETTINGS_FIELDS if len({json.dumps(r.provenance.get(f), sort_keys=True, default=str)
                                                  for r in records}) > 1]
    return differ or ["per-class sample cap (--max-samples)"]


def _refuse_two_checkpoints(older: ResultRecord | None, newer: ResultRecord, path: ResultsFiles) -> None:
    """One point per (class, epoch) of a run: entries of two different checkpoints there
    (e.g. several plain state dicts of unknown epoch, -1) cannot be told apart on an epoch axis."""
    if older is None:
        return
    shas = {str(r.provenance.get("checkpoint_sha256", "")) for r in (older, newer)}
    if len(shas) > 1:
        raise ValueError(f"{describe_files(path)}: run {newer.run!r} holds entries of different checkpoints at epoch {newer.epoch} "
                         f"(class {newer.class_index}): {older.provenance.get('checkpoint_path')} and "
                         f"{newer.provenance.get('checkpoint_path')}; put them in separate folders (runs) or give them epochs")


# Provenance that defines a Hessian: the weights, the class's samples, and the
# loss, parameter selection and precision it is formed with.
HESSIAN_IDENTITY = ("checkpoint_sha256", "class_index", "split", "sample_indices_sha256", "data_sha256", "params",
                    "loss_fn", "dtype")


def same_hessian_eigs(path: ResultsFiles, record: ResultRecord) -> ResultRecord | None:
    """The newest ``eigs`` entry of the same Hessian as ``record`` (same values of every
    :data:`HESSIAN_IDENTITY` attribute), or None: e.g. to mark λmin/λmax on a density,
    which an eigs entry restricted to other parameters or computed in another dtype
    must not do."""
    wanted = tuple(record.provenance.get(a) for a in HESSIAN_IDENTITY)
    matches = [r for r in read_results(path, kind="eigs")
               if tuple(r.provenance.get(a) for a in HESSIAN_IDENTITY) == wanted]
    matches.sort(key=lambda r: str(r.provenance.get("created_utc", "")))
    return matches[-1] if matches else None


def density_record(
    path: ResultsFiles, class_index: int, epoch: int, run: "str | Run | None" = None
) -> ResultRecord:
    """The newest ``density`` entry of one class at one epoch (of one run)."""
    records = read_results(path, kind="density")
    if not records:
        raise ValueError(f"{describe_files(path)} holds no density entries")
    of_run = ""
    if run is not None:
        records = _of_run(records, run, path, "density entries")
        of_run = f" of run {find_run(path, run).label!r}"
    records = [r for r in records if r.class_index == class_index and r.epoch == epoch]
    if not records:
        raise ValueError(f"no density entry for class {class_index} at epoch {epoch}{of_run} in {describe_files(path)}")
    return _one_run(records, path, f"density entries for class {class_index} at epoch {epoch}")[-1]
