"""The files of a training run's folder: which exist, the ``last.pt`` a resume
starts from, and the JSON-lines logs (``metrics.jsonl``, ``spectra.jsonl``)
cut back to the resumed epoch."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import distributed as sd
from .checkpoint import atomic_write_bytes, load_training_checkpoint

__all__ = ["existing_run_files", "check_out_dir_is_free", "readable_last", "stored_memory_format", "jsonl_records",
           "truncate_logs", "logged_epochs", "listed", "PRE_CHECKPOINT_FILES", "LOG_FILES"]

# The run's JSON-lines logs, one record per line with its "epoch".
LOG_FILES = ("metrics.jsonl", "spectra.jsonl")


def existing_run_files(out_dir: str | Path) -> list[str]:
    """Names of the files of a training run in ``out_dir`` (checkpoints,
    ``last.pt``, ``metrics.jsonl``, ``summary.json``), sorted; [] for none."""
    folder = Path(out_dir)
    if not folder.is_dir():
        return []
    names = {"last.pt", "metrics.jsonl", "summary.json"}
    return sorted(p.name for p in folder.iterdir() if p.name in names or p.name.startswith("ckpt_") and p.suffix == ".pt")


# Run files that an attempt killed before its first checkpoint leaves: they alone do not make a run to resume.
PRE_CHECKPOINT_FILES = frozenset({"metrics.jsonl"})


def listed(names: list[str]) -> str:
    """The first three names, for a one-line message."""
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def check_out_dir_is_free(out_dir: str | Path) -> None:
    """Raise ``ValueError`` (one line) when ``out_dir`` already holds the files
    of a run (:func:`existing_run_files`): a new run would overwrite its
    checkpoints and append a second run to its ``metrics.jsonl``. Collective
    under torchrun (rank 0's view of the folder decides for every rank)."""
    found = sd.broadcast_from_writer(existing_run_files(out_dir) if sd.is_writer() else None)
    if found:
        raise ValueError(f"{out_dir} already holds a run ({listed(found)}); "
                         "pass --resume to continue it or choose another --out")


def readable_last(out_dir: Path) -> dict[str, Any] | None:
    """``out_dir/last.pt`` loaded on the CPU, or None when it is missing or unreadable (the trainer's resume
    then starts over or gives the one-line error)."""
    try:
        return load_training_checkpoint(out_dir / "last.pt", map_location="cpu")
    except Exception:  # noqa: BLE001 - reported by Trainer._resume
        return None


def stored_memory_format(last: dict[str, Any] | None) -> bool | None:
    """The ``channels_last`` the run of ``last`` was made with (None: its default, or no checkpoint).
    A resume without the option keeps it, so it goes on bit for bit; an explicit
    ``--channels-last/--no-channels-last`` changes it."""
    stored = (last or {}).get("config", {}).get("channels_last")
    return stored if isinstance(stored, bool) else None


def jsonl_records(path: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    """``(line, record)`` for each non-empty line of the JSON-lines ``text`` read
    from ``path``. An unparsable last line without its newline is a write cut
    short by a kill and is skipped; any other bad line raises ``ValueError``
    naming the file and the line."""
    lines = text.splitlines()
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            if number == len(lines) and not text.endswith("\n"):
                continue
            raise ValueError(f"{path} line {number} is not a JSON record ({exc.msg}); fix or remove that line") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {number} is not a JSON object")
        out.append((line, record))
    return out


def truncate_logs(out_dir: Path, epoch: int) -> None:
    """Drop log lines written after ``epoch`` (the checkpoint a run resumes from) and a torn last
    line. A log with nothing to drop is left untouched (same inode and mode), so resuming a
    finished run changes no file."""
    for name in LOG_FILES:
        path = out_dir / name
        if not path.is_file():
            continue
        text = path.read_text()
        kept = [ln for ln, record in jsonl_records(path, text) if record.get("epoch", 0) <= epoch]
        new = "".join(ln + "\n" for ln in kept)
        if new != text:
            atomic_write_bytes(path, new.encode())


def logged_epochs(out_dir: Path, name: str) -> set[int]:
    """Epochs that have a line in the run's log ``name``."""
    path = out_dir / name
    if not path.is_file():
        return set()
    return {record.get("epoch") for _, record in jsonl_records(path, path.read_text())}
