"""Resumable sweeps: every checkpoint × class × kind into one results file.

A *sweep* runs the job of :func:`spectra.analysis.analyse_class`,
(checkpoint, class, settings) → record of the per-class Hessian

    H_c = ∇²_θ (1/N_c) Σ_{i: y_i = c} ℓ(f_θ(x_i), y_i),

for every checkpoint × class × kind into one HDF5 file. Each entry is keyed
by the checkpoint's SHA-256, the class, the kind and a hash of the settings,
so a rerun skips what is stored already. :func:`run_sweep` is a library
function with a progress callback; the CLI, training's periodic analysis and
demos call it.

Under ``torchrun`` (a ``torch.distributed`` group with several ranks) the
same functions split the work (see ``docs/distributed.md``): by default each
rank keeps a disjoint block of every class's samples and the operator
all-reduces its products, so every rank computes the same result and only
rank 0 writes; ``run_sweep(..., spread="jobs")`` instead deals whole jobs
to ranks and gathers their records on rank 0.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from spectra import distributed as sd
from spectra.analysis import AnalysisSettings, LoadOptions, analyse_class, resolve_device
from spectra.checkpoints import CheckpointError, LoadedCheckpoint, first_line, load_checkpoint, located, read_checkpoint_epoch
from spectra.class_data import AnalysisError, DataCache, DataOptions, resolve_classes
from spectra.store import ResultRecord, ResultsWriter, StoreError, entry_key

__all__ = [
    "SPREADS",
    "expand_checkpoints",
    "SweepEvent",
    "SweepSummary",
    "run_sweep",
    "open_writer_on_rank_zero",
]

# How a sweep uses several ranks: every rank on every job with a block of its
# samples ("samples"), or whole jobs dealt to ranks ("jobs").
SPREADS = ("samples", "jobs")

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
    # Unknown epochs (-1: e.g. a plain state dict named last.pt) after the numbered ones, so that of two
    # identical files in a folder the one whose name gives the epoch is analysed, the other skipped.
    return sorted(unique, key=lambda p: (str(located(p).parent), epochs[p] < 0, epochs[p], p.name))


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
    """Jobs computed, skipped as stored, copied from another run's entry of a
    byte-identical checkpoint (see :mod:`spectra.store`), and failed (messages)."""

    computed: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    copied: int = 0


def open_writer_on_rank_zero(out: str | os.PathLike[str] | None) -> contextlib.AbstractContextManager[ResultsWriter | None]:
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
    checkpoints: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    classes: str | Iterable[str | int] = "all",
    kinds: str | Sequence[str] = ("eigs",),
    settings: AnalysisSettings | None = None,
    data_options: DataOptions | None = None,
    load_options: LoadOptions | None = None,
    progress: Callable[[SweepEvent], None] | None = None,
    spread: str = "samples",
) -> SweepSummary:
    """Every checkpoint × class × kind into the results file ``out``, resumably.

    ``checkpoints``: files or run folders (one path may be given alone);
    ``kinds``: analyses (one may be given as a string). Either being empty is
    an ``AnalysisError`` before ``out`` is created.

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
    checkpoints, kinds = _as_list(checkpoints, "checkpoints"), _as_list(kinds, "kinds")
    for kind in kinds:
        settings.with_kind(kind)  # validates the kind and its settings
    files = expand_checkpoints(checkpoints)
    plan = _SweepPlan(classes, kinds, settings, data_options, load_options,
                      resolve_device(data_options.device), progress)
    with _writer_on_rank_zero(out) as writer:
        if spread == "jobs" and sd.current_world_size() > 1:
            return _sweep_spreading_jobs(files, plan, writer)
        return _sweep_sharing_samples(files, plan, writer)


def _as_list(items: Any, what: str) -> list[Any]:
    """One str/path as a list of itself (iterating it would give its characters); an
    empty list is an error before any file is created."""
    listed = [items] if isinstance(items, (str, os.PathLike)) else list(items)
    if not listed:
        raise AnalysisError(f"run_sweep needs at least one of {what}, got none")
    return listed


def _open_job_source(path: Path, plan: _SweepPlan, cache: DataCache) -> tuple[LoadedCheckpoint, list[int], dict[str, Any]]:
    """The checkpoint, its wanted classes and the data identity (for the settings hash)."""
    lo = plan.load_options
    checkpoint = load_checkpoint(path, lo.arch, lo.arch_kwargs, lo.trust)
    # The data is loaded even when every job is stored: its content hash is part of the entry keys, and
    # another data set (--dataset) may have other classes than the checkpoint records.
    return checkpoint, resolve_classes(plan.classes, cache.source(checkpoint).class_names), cache.identity(checkpoint)


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
            error = first_line(exc)
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
                if sd.broadcast_from_writer(writer is not None and _stored(writer, key, checkpoint, summary)):
                    if writer is None:  # the writer counted it (stored or copied)
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
                        error = first_line(exc)
                    if sd.any_rank(error is not None):
                        message = error or "failed on another rank"
                        summary.failed.append(f"{path} class {c} {kind}: {message}")
                        event.status, event.message = "failed", message
                    else:
                        _store(writer, record, summary, event, f"{path} class {c} {kind}")
                if report:
                    report(event)
    return summary


def _stored(writer: ResultsWriter, key: str, checkpoint: LoadedCheckpoint, summary: SweepSummary) -> bool:
    """Whether the job is stored (counted); a byte-identical checkpoint another run
    still holds gives this run a copy of its entry (:meth:`ResultsWriter.stored_for`)."""
    path = located(checkpoint.path)
    try:
        found = writer.stored_for(key, str(path), path.parent.name, checkpoint.epoch)
    except (OSError, ValueError, StoreError) as exc:  # the copy failed; the stored entry is intact
        summary.failed.append(f"{path}: could not copy the stored entry {key} for this run ({first_line(exc)})")
        return True
    summary.copied += found == "copied"
    summary.skipped += found == "stored"
    return found is not None


def _store(writer: ResultsWriter | None, record: ResultRecord | None, summary: SweepSummary,
           event: SweepEvent, label: str) -> None:
    """Commit ``record`` (on the writer rank; the others only count it)."""
    try:
        if writer is not None and record is not None:
            writer.write(record)
        summary.computed += 1
        event.status, event.record = "done", record
    except (OSError, ValueError) as exc:
        summary.failed.append(f"{label}: {first_line(exc)}")
        event.status, event.message = "failed", first_line(exc)


# One job of a sweep spread over ranks: (checkpoint path, class, kind).
_Job = tuple[str, int, str]


# A job whose checkpoint is byte-identical to a pending one's (another run's copy): it gets a copy
# of that job's entry once computed. (job path, checkpoint, class, kind, entry key)
_Twin = tuple[Path, LoadedCheckpoint, int, str, str]


def _pending_jobs(files: list[Path], plan: _SweepPlan, writer: ResultsWriter, summary: SweepSummary,
                  ) -> tuple[list[_Job], list[SweepEvent], list[_Twin]]:
    """Rank 0's list of the jobs not stored yet, events for the skipped ones, and the twins of
    pending jobs (computed once: the serial sweep copies the entry for them just the same)."""
    cache = DataCache(plan.data_options, rank=0, world=1)
    pending: list[_Job] = []
    events: list[SweepEvent] = []
    twins: list[_Twin] = []
    pending_keys: set[str] = set()
    for path in files:
        try:
            checkpoint, wanted, identity = _open_job_source(path, plan, cache)
        except _LOAD_ERRORS as exc:
            summary.failed.append(f"{path}: {first_line(exc)}")
            events.append(SweepEvent(0, 0, path, -1, -1, "", "failed", first_line(exc)))
            continue
        for c in wanted:
            for kind in plan.kinds:
                key = entry_key(checkpoint.sha256, c, kind, plan.settings.with_kind(kind).settings_hash(identity))
                if _stored(writer, key, checkpoint, summary):
                    events.append(SweepEvent(0, 0, path, checkpoint.epoch, c, kind, "skipped"))
                elif key in pending_keys:
                    twins.append((path, checkpoint, c, kind, key))
                else:
                    pending_keys.add(key)
                    pending.append((str(path), c, kind))
    return pending, events, twins


def _copy_for_twins(twins: list[_Twin], writer: ResultsWriter, summary: SweepSummary) -> Iterator[SweepEvent]:
    """After the pending jobs: each twin's copy of its computed entry (a failed original fails it too)."""
    for path, checkpoint, c, kind, key in twins:
        event = SweepEvent(0, 0, path, checkpoint.epoch, c, kind, "skipped")
        if not _stored(writer, key, checkpoint, summary):
            event.status, event.message = "failed", "not computed: the same job of a byte-identical checkpoint failed"
            summary.failed.append(f"{path} class {c} {kind}: {event.message}")
        yield event


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
            return "failed", first_line(exc)


def _sweep_spreading_jobs(files: list[Path], plan: _SweepPlan, writer: ResultsWriter | None) -> SweepSummary:
    """Jobs dealt round-robin over ranks; records gathered on rank 0 each round."""
    summary = SweepSummary()
    listed = _pending_jobs(files, plan, writer, summary) if writer is not None else None
    pending: list[_Job] = sd.broadcast_from_writer(listed[0] if listed else None)
    twins = listed[2] if listed else []
    world = sd.current_world_size()
    total = len(pending) + len(twins) + summary.skipped + summary.copied + len(summary.failed)
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
    for event in _copy_for_twins(twins, writer, summary) if writer is not None else ():
        index += 1
        event.index, event.total = index, total
        if report:
            report(event)
    return summary
