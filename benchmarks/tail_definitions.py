"""Which "tail" did the paper mean? Its table gives overall and tail accuracy
but does not define the tail. For k = 1 … C−1, take the k rarest classes as
the tail and compare the gap (overall − tail) of our runs with the paper's,
row by row: the gap is a within-run quantity, so an offset that lowers a whole
row (our JPEG data, REPRODUCTION.md) moves it far less than it moves either
number. Reads each run's ``summary.json`` (final per-class accuracies).

    python benchmarks/tail_definitions.py benchmarks/results/cifar10lt_h200 --exclude vs,vs-sam
    python benchmarks/tail_definitions.py runs/table --json tails.json

Prints, per k, the tail classes, the RMS over rows of (our gap − the paper's
gap) and each row's difference; rows in ``--exclude`` are shown but left out
of the RMS.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_cifar10lt import BASELINES, PAPER  # noqa: E402

from spectra.train.evaluation import tail_classes  # noqa: E402


def final_per_class(run_dir: Path) -> tuple[float, list[float], list[int]] | None:
    """Overall accuracy, per-class accuracies and class counts of a finished run (None: no summary)."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
        final = summary["final"]
        return float(final["acc"]), [float(a) for a in final["per_class_acc"]], [int(n) for n in summary["class_counts"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"error: {path} has no final per-class accuracies ({type(exc).__name__}: {exc})") from None


def gap_table(runs: dict[str, tuple[float, list[float], list[int]]], paper: dict[str, tuple[float, float]],
              exclude: set[str]) -> list[dict[str, Any]]:
    """One row per tail size k: its classes, each run's (our gap − paper gap) and their RMS over the kept runs."""
    counts = next(iter(runs.values()))[2]
    rows = []
    for k in range(1, len(counts)):
        tail = tail_classes(counts, k / len(counts))
        diffs = {}
        for method, (acc, per_class, _) in runs.items():
            ours_tail = sum(per_class[c] for c in tail) / len(tail)
            paper_acc, paper_tail = paper[method]
            diffs[method] = (acc - ours_tail) - (paper_acc - paper_tail)
        kept = [d for m, d in diffs.items() if m not in exclude]
        rms = math.sqrt(sum(d * d for d in kept) / len(kept)) if kept else float("nan")
        rows.append({"k": k, "tail_classes": tail, "rms": rms, "gap_difference": diffs})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, help="folder with one sub-folder per method (as reproduce_cifar10lt.py writes)")
    p.add_argument("--exclude", default="", help="comma list of methods shown but left out of the RMS")
    p.add_argument("--json", type=Path, help="also write the table as JSON")
    args = p.parse_args(argv)
    paper = {m: (a, t) for m, a, t in PAPER + BASELINES}
    runs = {m: r for m in paper if (r := final_per_class(args.runs / m)) is not None}
    if not runs:
        raise SystemExit(f"error: no finished run of the paper's methods in {args.runs} (expected <method>/summary.json)")
    if len({tuple(r[2]) for r in runs.values()}) > 1:
        raise SystemExit(f"error: the runs in {args.runs} were trained on different class counts")
    exclude = {m for m in args.exclude.split(",") if m}
    rows = gap_table(runs, paper, exclude)
    methods = list(runs)
    print(f"# (our overall − tail) − (paper's overall − tail), points; RMS over {', '.join(m for m in methods if m not in exclude)}")
    print("| k rarest | classes | RMS | " + " | ".join(methods) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in methods) + " |")
    for r in rows:
        cells = " | ".join(f"{r['gap_difference'][m]:+.1f}" for m in methods)
        print(f"| {r['k']} | {','.join(map(str, r['tail_classes']))} | {r['rms']:.2f} | {cells} |")
    if args.json:
        args.json.write_text(json.dumps({"runs": str(args.runs), "excluded_from_rms": sorted(exclude), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
