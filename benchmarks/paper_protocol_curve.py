"""|λmin/λmax| over epochs measured both ways, from the JSON of ``paper_protocol.py``:
spectra's exact values against the paper's (augmented operator, 100-step Ritz extremes).

The files are merged: entries are keyed by (run, class, epoch), and the paper's-way
runs of one key are pooled by augmentation seed (a seed measured twice counts once).
Per run and class this prints the exact ratio, the paper's-way ratio (mean over
seeds; every seed's value with ``--verbose``) and their quotient. With ``--out``, it
draws one panel per class, with the exact values as solid lines and the paper's way as
dashed lines (mean over seeds, each seed a dot), one colour per run, on a log axis;
``--mark`` epochs (e.g. where DRW starts) as dotted lines.

    python benchmarks/paper_protocol_curve.py paper_protocol_epochs_class9.json \\
        paper_protocol_epochs_class0.json paper_protocol_e200.json --out paper_protocol_curve.png --mark 160
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_protocol import ratio  # noqa: E402  (the writer's reading of its own entries)
from spectra.plots import image_path, save_figure  # noqa: E402


@dataclass
class Point:
    """One (run, class, epoch): the exact ratio and the paper's-way ratio per augmentation seed."""

    exact: float
    augmented: dict[int, float] = field(default_factory=dict)

    @property
    def paper(self) -> float:
        return float(np.mean(list(self.augmented.values())))


def read_points(paths: list[Path]) -> dict[tuple[str, int], dict[int, Point]]:
    """(run, class) → epoch → :class:`Point`, over all files."""
    curves: dict[tuple[str, int], dict[int, Point]] = {}
    for path in paths:
        try:
            entries = json.loads(path.read_text())["entries"]
            for e in entries:
                point = curves.setdefault((e["run"], int(e["class"])), {}).setdefault(
                    int(e["epoch"]), Point(ratio(e["exact"])))
                for a in e["ritz_augmented"]:
                    point.augmented.setdefault(int(a["seed"]), ratio(a))
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as exc:
            raise SystemExit(f"error: {path} is not a paper_protocol.py result ({type(exc).__name__}: {exc})") from None
    curves = {key: points for key, points in curves.items() if any(p.augmented for p in points.values())}
    if not curves:
        raise SystemExit("error: no entry with a paper's-way (augmented) measurement in " + ", ".join(map(str, paths)))
    return curves


def table_rows(curves: dict[tuple[str, int], dict[int, Point]]) -> list[dict[str, Any]]:
    """One row per (run, class, epoch) with a paper's-way value, sorted."""
    return [{"run": run, "class": c, "epoch": epoch, "exact": p.exact, "paper": p.paper,
             "paper_seeds": {str(s): v for s, v in sorted(p.augmented.items())}, "inflation": p.paper / p.exact}
            for (run, c), points in sorted(curves.items(), key=lambda kv: (kv[0][1], kv[0][0]))
            for epoch, p in sorted(points.items()) if p.augmented]


def print_table(rows: list[dict[str, Any]], verbose: bool) -> None:
    print(f"{'run':<18} {'class':>5} {'epoch':>5} {'exact':>8} {'paper':>8} {'paper/exact':>11}")
    for r in rows:
        line = f"{r['run']:<18} {r['class']:>5} {r['epoch']:>5} {r['exact']:>8.4f} {r['paper']:>8.4f} {r['inflation']:>11.1f}"
        if verbose:
            line += "   seeds " + " ".join(f"{s}:{v:.4f}" for s, v in r["paper_seeds"].items())
        print(line)


def plot(curves: dict[tuple[str, int], dict[int, Point]], out: Path, marks: list[int]) -> None:
    classes = sorted({c for _, c in curves})
    runs = sorted({run for run, _ in curves})
    colours = {run: f"C{i}" for i, run in enumerate(runs)}
    fig = Figure(figsize=(5.0 * len(classes) + 1.0, 4.0), layout="constrained")
    axes = fig.subplots(1, len(classes), sharey=True, squeeze=False)[0]
    for ax, c in zip(axes, classes):
        for run in runs:
            points = curves.get((run, c), {})
            epochs = sorted(points)
            if not epochs:
                continue
            ax.plot(epochs, [points[e].exact for e in epochs], "-o", markersize=3, color=colours[run],
                    label=f"{run}, exact")
            measured = [e for e in epochs if points[e].augmented]
            ax.plot(measured, [points[e].paper for e in measured], "--", color=colours[run],
                    label=f"{run}, paper's way")
            for e in measured:
                ax.plot([e] * len(points[e].augmented), list(points[e].augmented.values()), ".",
                        color=colours[run], alpha=0.6)
        for epoch in marks:
            ax.axvline(epoch, color="grey", linestyle=":", linewidth=1)
        ax.set_yscale("log")
        ax.set_title(f"class {c}")
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(r"$|\lambda_{\min} / \lambda_{\max}|$")
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("Exact (fixed operator, residual-checked) vs the paper's way (augmented operator, 100-step Ritz)",
                 fontsize=9)
    save_figure(fig, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="JSON files written by paper_protocol.py --json")
    parser.add_argument("--out", type=Path, default=None, help="draw the curves into this image")
    parser.add_argument("--json", type=Path, default=None, help="write the table here")
    parser.add_argument("--mark", type=int, action="append", default=[],
                        help="draw a dotted line at this epoch (e.g. 160, where DRW starts); repeatable")
    parser.add_argument("--verbose", action="store_true", help="print every augmentation seed's ratio")
    args = parser.parse_args(argv)
    if args.out is not None:
        try:
            args.out = image_path(args.out)  # before any work: a bad path fails at once
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from None
    curves = read_points(args.results)
    rows = table_rows(curves)
    print_table(rows, args.verbose)
    if args.json is not None:
        args.json.write_text(json.dumps({"sources": [str(p) for p in args.results], "rows": rows}, indent=1) + "\n")
    if args.out is not None:
        plot(curves, args.out, args.mark)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
