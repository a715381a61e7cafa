"""Per-class Hessian extremes during training (``--spectra-every N``).

For every class c: ``λmax`` and ``λmin`` of the Hessian of the mean plain
cross-entropy over (up to ``samples_per_class``) un-augmented training images
of class c, model in eval mode — one ``eigs`` job of :mod:`spectra.analysis`
(Lanczos with a residual check) on the checkpoint the trainer has just saved.

The records go into the run's results file (``runs/NAME/results.h5``) in the
schema of ``spectra sweep``, under the same keys a sweep of that checkpoint
with the same settings would use (``--max-samples K --tol 1e-3 --max-iter M``
skips them), so ``spectra plot ratio runs/NAME/results.h5`` works directly.
Classes already stored under their key (a probe cut by a kill and redone on
``--resume``) are read back, not recomputed.
The trainer also appends a compact line per probe to ``spectra.jsonl``
(:meth:`PerClassSpectra.summary`), which holds ``|λmin/λmax|``, the paper's
saddle indicator.

Under ``torchrun`` every rank calls the probe: each keeps a block of every
class's samples, the operator all-reduces, and rank 0 alone writes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from ..analysis import AnalysisError, AnalysisSettings, analyse_class
from ..checkpoints import LoadedCheckpoint
from ..class_data import DataCache, DataOptions
from .. import distributed as sd
from ..store import ResultRecord, entry_key
from ..sweep import open_writer_on_rank_zero

__all__ = ["PerClassSpectra", "ProbeEvent", "RESULTS_FILE"]

RESULTS_FILE = "results.h5"


class ProbeEvent(NamedTuple):
    """Progress of a probe: class ``class_index`` of ``num_classes`` has started
    (``status="start"``), is ``"done"`` (``record`` set) or was ``"skipped"``
    (``reason``: no samples, or a diverged model)."""

    class_index: int
    num_classes: int
    class_name: str
    status: str
    record: ResultRecord | None = None
    reason: str = ""


class PerClassSpectra:
    """Callable ``probe(checkpoint) -> [ResultRecord per class]``, stored in ``results``.

    ``checkpoint``: the in-memory model with the identity (path, SHA-256,
    epoch, data set) of the file it was just saved to. ``data_root``: where
    the training data lives (None: ``$SPECTRA_DATA_ROOT`` or the default).
    """

    def __init__(self, results: str | Path | None, device: torch.device, data_root: str | None = None,
                 samples_per_class: int = 500, batch_size: int = 250, tol: float = 1e-3,
                 max_iter: int = 100) -> None:
        self.results = Path(results) if results is not None else None
        self.device = device
        self.batch_size = batch_size
        # No CUDA graphs: the model is the one being trained (its parameters move between probes and
        # training may replay graphs of its own); eager products are the safe choice here.
        self.settings = AnalysisSettings(kind="eigs", top_k=1, bottom_k=1, tol=tol, max_iter=max_iter, seed=0,
                                         cuda_graphs=False)
        self.cache = DataCache(DataOptions(root=data_root, split="train", max_samples=samples_per_class,
                                           batch_size=batch_size, device=str(device)))

    def check_results_file(self) -> None:
        """Open and close the results file (rank 0): a foreign, unreadable or
        locked file raises ``StoreError`` here, before training starts."""
        with open_writer_on_rank_zero(self.results):
            pass

    def __call__(self, checkpoint: LoadedCheckpoint,
                 on_class: Callable[[ProbeEvent], None] | None = None) -> list[ResultRecord]:
        """Analyse every class that has samples; store the records (rank 0).
        ``on_class`` hears of each class as it starts and ends (progress: one
        class's Lanczos runs can take minutes)."""
        source = self.cache.source(checkpoint)
        identity = self.cache.identity(checkpoint)
        tell = on_class or (lambda event: None)
        n = len(source.class_names)
        records = []
        settings_hash = self.settings.settings_hash(identity)
        with open_writer_on_rank_zero(self.results) as writer:
            for c, name in enumerate(source.class_names):
                tell(ProbeEvent(c, n, str(name), "start"))
                # Stored already (a probe cut by a kill, redone on resume): the same checkpoint file and settings.
                stored = sd.broadcast_from_writer(
                    writer.read(entry_key(checkpoint.sha256, c, self.settings.kind, settings_hash)) if writer else None)
                if stored is not None:
                    records.append(stored)
                    tell(ProbeEvent(c, n, str(name), "done", stored))
                    continue
                try:
                    data = self.cache.class_data(checkpoint, c)
                    record = analyse_class(checkpoint, data, self.settings, self.device, self.batch_size,
                                           source.description, identity, source.class_counts)
                except AnalysisError as exc:  # no samples, or a diverged model: the same on every rank
                    tell(ProbeEvent(c, n, str(name), "skipped", reason=str(exc).splitlines()[0] if str(exc) else ""))
                    continue
                if writer is not None:
                    writer.write(record)
                records.append(record)
                tell(ProbeEvent(c, n, str(name), "done", record))
        return records

    @staticmethod
    def summary(records: list[ResultRecord]) -> dict[str, Any]:
        """``{"classes", "lambda_max", "lambda_min", "ratio", "converged", "num_matvecs"}`` (spectra.jsonl)."""
        out: dict[str, Any] = {"classes": [], "lambda_max": [], "lambda_min": [], "ratio": [], "converged": [],
                               "num_matvecs": []}
        for r in records:
            lmax, lmin = float(r.arrays["top"][0]), float(r.arrays["bottom"][0])
            out["classes"].append(r.class_index)
            out["lambda_max"].append(lmax)
            out["lambda_min"].append(lmin)
            out["ratio"].append(abs(lmin / lmax) if lmax else float("nan"))
            out["converged"].append(bool(r.provenance["converged"]))
            out["num_matvecs"].append(int(r.provenance["num_matvecs"]))
        return out
