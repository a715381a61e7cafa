"""Figures of stored results: |λmin/λmax| per class over epochs, spectral densities.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never
through ``pyplot``: no global backend is switched and nothing needs a display,
so the functions are safe inside notebooks, servers and test runs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from spectra.results_query import EigenSeries
from spectra.store import ResultRecord

__all__ = [
    "head_to_tail_order",
    "saddle_ratio",
    "missing_extremes",
    "plot_ratio",
    "plot_density",
    "image_path",
    "save_figure",
]

# Head classes blue, tail classes red.
_COLORMAP = "coolwarm"
_MAX_LEGEND_CLASSES = 12
_MAX_NOTES = 4


def saddle_ratio(series: EigenSeries) -> np.ndarray:
    """|λmin / λmax| per epoch: large values mean strong negative curvature
    relative to the sharpest direction (a saddle point rather than a minimum).
    NaN where λmin or λmax was not stored."""
    return np.abs(series.lambda_min / series.lambda_max)


def missing_extremes(
    tables: Mapping[str, Mapping[int, EigenSeries]], class_names: Mapping[int, str] | None = None
) -> list[str]:
    """One line per (run, class) whose entries lack λmin or λmax (stored with
    bottom-k 0 or top-k 0), naming the epochs: why the ratio has gaps there."""
    class_names = class_names or {}
    notes = []
    for run, table in tables.items():
        for c, series in sorted(table.items()):
            for end, values, option in (("λmin", series.lambda_min, "bottom-k"), ("λmax", series.lambda_max, "top-k")):
                missing = series.epochs[np.isnan(values)]
                if missing.size == 0:
                    continue
                where = "all epochs" if missing.size == series.epochs.size else \
                    "epoch" + ("s " if missing.size > 1 else " ") + ", ".join(str(e) for e in missing)
                notes.append(f"{run} class {c} ({class_names.get(c, c)}): no {end} at {where} "
                             f"(stored with {option} 0)")
    return notes


def image_path(out: str | os.PathLike[str]) -> Path:
    """The file a figure saved to ``out`` lands in, checked before any plotting.

    No suffix means PNG (``out.png``, as matplotlib would write). Raises
    ``ValueError`` (one line) for a format matplotlib cannot write or a folder
    that does not exist.
    """
    path = Path(out)
    supported = FigureCanvasAgg(Figure()).get_supported_filetypes()
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    fmt = path.suffix[1:].lower()
    if fmt not in supported:
        raise ValueError(f"cannot write a {path.suffix} image ({path}); use one of "
                         + ", ".join(f".{k}" for k in sorted(supported)))
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"folder {folder} of the output image does not exist")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"{path} is not writable")
    return path


def head_to_tail_order(classes: Sequence[int], sizes: Mapping[int, int] | None) -> list[int]:
    """Classes from the most to the least frequent (ties and unknown sizes by index)."""
    sizes = sizes or {}
    return sorted(classes, key=lambda c: (-sizes.get(c, 0), c))


def save_figure(fig: Figure, out: str | os.PathLike[str], dpi: int = 150) -> Path:
    """Render ``fig`` with the Agg canvas to ``out`` (format from the suffix, PNG
    without one); returns the path written (see :func:`image_path`)."""
    path = image_path(out)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def plot_ratio(
    tables: Mapping[str, Mapping[int, EigenSeries]],
    class_names: Mapping[int, str] | None = None,
    class_sizes: Mapping[int, int] | None = None,
    out: str | os.PathLike[str] | None = None,
    log_scale: bool | None = None,
    title: str | None = None,
) -> Figure:
    """|λmin/λmax| per class over epochs; one panel per run, one line per class.

    ``tables``: run label → :func:`spectra.results_query.eigen_table` output. Lines are
    coloured from head (blue, most samples) to tail (red). ``log_scale=None``
    picks a log axis when the ratios span more than two decades. Epochs without
    λmin or λmax (NaN) are gaps; a class with no complete epoch gets no line,
    and a footnote names what is missing (:func:`missing_extremes`).
    """
    class_names = class_names or {}
    notes = missing_extremes(tables, class_names)
    if not any(table for table in tables.values()):
        raise ValueError("no eigenvalue entries to plot")
    tables = {run: {c: s for c, s in table.items() if np.isfinite(saddle_ratio(s)).any()}
              for run, table in tables.items()}
    all_classes = sorted({c for table in tables.values() for c in table})
    if not all_classes:
        raise ValueError("no eigs entry holds both λmin and λmax (stored with top-k 0 or bottom-k 0); "
                         "the ratio needs both")
    order = head_to_tail_order(all_classes, class_sizes)
    cmap = colormaps[_COLORMAP]
    colour = {c: cmap(i / max(len(order) - 1, 1)) for i, c in enumerate(order)}
    ratios = [saddle_ratio(s) for table in tables.values() for s in table.values()]
    positive = np.concatenate([r[r > 0] for r in ratios]) if ratios else np.array([])
    if log_scale is None:
        log_scale = positive.size > 0 and positive.max() / positive.min() > 100

    fig = Figure(figsize=(5.5 * len(tables) + 1.5, 4.2), layout="constrained")
    axes = fig.subplots(1, len(tables), sharey=True, squeeze=False)[0]
    for ax, (run, table) in zip(axes, tables.items()):
        for c in order:
            if c not in table:
                continue
            series = table[c]
            label = f"{c}: {class_names.get(c, c)}"
            if class_sizes and c in class_sizes:
                label += f" (n={class_sizes[c]})"
            ax.plot(series.epochs, saddle_ratio(series), marker="o", markersize=3, linewidth=1.6,
                    color=colour[c], label=label)
        ax.set_title(run)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        epochs = {int(e) for c in order if c in table for e in table[c].epochs}
        if len(epochs) == 1:  # one epoch: widen to whole epochs, or the locator falls back to fractional ticks
            (e,) = epochs
            ax.set_xlim(e - 1, e + 1)
        ax.grid(True, alpha=0.3)
        if log_scale:
            ax.set_yscale("log")
    axes[0].set_ylabel(r"$|\lambda_{\min} / \lambda_{\max}|$")
    if len(order) <= _MAX_LEGEND_CLASSES:
        axes[-1].legend(title="class (head → tail)", fontsize=8, title_fontsize=8,
                        loc="upper left", bbox_to_anchor=(1.02, 1.0))
    else:
        bar = fig.colorbar(ScalarMappable(norm=Normalize(0, len(order) - 1), cmap=colormaps[_COLORMAP]), ax=axes[-1])
        bar.set_label("class rank by size (0 = head)")
    fig.suptitle(title or "Per-class Hessian: negative vs positive curvature")
    if notes:
        shown = notes[:_MAX_NOTES] + ([f"... and {len(notes) - _MAX_NOTES} more"] if len(notes) > _MAX_NOTES else [])
        fig.supxlabel("\n".join(shown), fontsize=7, color="dimgrey")
    if out is not None:
        save_figure(fig, out)
    return fig


def plot_density(
    records: Sequence[ResultRecord] | ResultRecord,
    out: str | os.PathLike[str] | None = None,
    extremes: tuple[float, float] | None = None,
    title: str | None = None,
    labels: Sequence[str] | None = None,
) -> Figure:
    """Spectral density (log scale) of one or more ``density`` entries (epochs,
    classes or runs), one curve each.

    ``extremes``: (λmin, λmax) from an ``eigs`` entry, drawn as dashed lines
    (a NaN end, not stored, is left out). ``labels``: legend text per record
    (default: run, epoch and class from the provenance). The densities are
    floored at 1e-10 × the highest peak so the log axis stays readable.
    """
    items = [records] if isinstance(records, ResultRecord) else list(records)
    if not items:
        raise ValueError("no density entries to plot")
    if labels is not None and len(labels) != len(items):
        raise ValueError(f"{len(labels)} labels for {len(items)} density entries")
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    # One floor for all curves, so that overlaid densities share their baseline.
    floor = max(max(float(rec.arrays["values"].max()) for rec in items), 1e-300) * 1e-10
    for i, rec in enumerate(items):
        grid, values = rec.arrays["grid"], rec.arrays["values"]
        p = rec.provenance
        label = labels[i] if labels is not None else (
            f"{p.get('run', '')} epoch {p.get('epoch')}, class {p.get('class_index')} ({p.get('class_name', '')})")
        ax.semilogy(grid, np.maximum(values, floor), color=f"C{i % 10}", linewidth=1.4, label=label)
    if extremes is not None:
        for value, name, colour in zip(extremes, (r"$\lambda_{\min}$", r"$\lambda_{\max}$"), ("crimson", "darkorange")):
            if np.isfinite(value):
                ax.axvline(value, color=colour, linestyle="--", linewidth=1.0, label=f"{name} = {value:.4g}")
    ax.axvline(0.0, color="grey", linewidth=0.6)
    ax.set_xlabel(r"eigenvalue $\lambda$")
    ax.set_ylabel("density (log scale)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or _density_title(items), fontsize=10)
    if out is not None:
        save_figure(fig, out)
    return fig


def _density_title(items: Sequence[ResultRecord]) -> str:
    """Title naming the class (and its sample count) or, for several, the classes."""
    classes = sorted({r.class_index for r in items})
    first = items[0].provenance
    if len(classes) == 1:
        counts = list(dict.fromkeys(str(r.provenance.get("num_samples")) for r in items))  # may differ between runs
        return (f"Hessian spectral density — class {first.get('class_index')} ({first.get('class_name', '')}), "
                f"{' / '.join(counts)} samples")
    return "Hessian spectral density — classes " + ", ".join(str(c) for c in classes)
