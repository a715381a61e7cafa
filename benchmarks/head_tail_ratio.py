"""Head and tail |λmin/λmax| of every run of a results file, over epochs: the
numbers behind the paper's figure (does the tail end nearer a saddle than the head?).

Per run and epoch: the mean of |λmin/λmax| over the ``--group`` classes with the
most training samples (head) and the ``--group`` with the fewest (tail), class
sizes as the entries record them (``class_counts``); and every class's λmax and
λmin. An epoch where a head or tail class has no entry yet (a sweep still
running) is listed with its available classes but no head/tail mean.
Several files are read as one. ``--versus RUN`` also counts, per epoch and
other run, the classes whose ratio is higher than RUN's (a paired reading of
two runs, class by class).

    python benchmarks/head_tail_ratio.py figure_cpu.h5 --group 3 --json head_tail.json
    python benchmarks/head_tail_ratio.py ce_drw_s0.h5 figure_cpu.h5 --versus ce-drw-s0
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import positive  # noqa: E402
from spectra.results_query import class_sizes, eigen_table, list_runs  # noqa: E402
from spectra.store import ResultsFiles, StoreError, describe_files  # noqa: E402


def head_and_tail(sizes: dict[int, int], group: int) -> tuple[list[int], list[int]]:
    """The ``group`` largest and ``group`` smallest classes (ties by class index); they must not overlap."""
    if 2 * group > len(sizes):
        raise SystemExit(f"error: --group {group} needs {2 * group} classes; the file has {len(sizes)}")
    order = sorted(sizes, key=lambda c: (-sizes[c], c))
    return sorted(order[:group]), sorted(order[-group:])


def _mean_ratio(point: dict[int, tuple[float, float]], classes: list[int]) -> float | None:
    """Mean |λmin/λmax| over ``classes``; None when one of them is missing at this epoch."""
    if any(c not in point for c in classes):
        return None
    return sum(_ratio(point[c]) for c in classes) / len(classes)


def _ratio(lam: tuple[float, float] | list[float]) -> float:
    """|λmin/λmax| of one (λmax, λmin)."""
    return abs(lam[1] / lam[0])


def run_summary(path: ResultsFiles, run: Any, head: list[int], tail: list[int]) -> list[dict[str, Any]]:
    """Per epoch of ``run``: head and tail mean ratio and each class's (λmax, λmin)."""
    by_epoch: dict[int, dict[int, tuple[float, float]]] = {}
    for c, series in eigen_table(path, run).items():
        for e, lmax, lmin in zip(series.epochs, series.lambda_max, series.lambda_min):
            if math.isfinite(lmax) and math.isfinite(lmin) and lmax != 0:
                by_epoch.setdefault(int(e), {})[c] = (float(lmax), float(lmin))
    return [{"epoch": e, "head_ratio": _mean_ratio(point, head), "tail_ratio": _mean_ratio(point, tail),
             "lambda": {str(c): list(point[c]) for c in sorted(point)}}
            for e, point in sorted(by_epoch.items())]


def summarise(path: ResultsFiles, group: int) -> dict[str, Any]:
    """``{"head": [...], "tail": [...], "runs": {label: [per-epoch rows]}}`` of a results file (or several read as one)."""
    try:
        sizes = class_sizes(path)
        runs = list_runs(path)
    except (OSError, ValueError, StoreError) as exc:
        raise SystemExit(f"error: cannot read {describe_files(path)} ({type(exc).__name__}: {exc})") from None
    head, tail = head_and_tail(sizes, group)
    return {"file": describe_files(path), "head": head, "tail": tail, "class_sizes": {str(c): n for c, n in sorted(sizes.items())},
            "runs": {run.label: run_summary(path, run, head, tail) for run in runs}}


def _class_ratios(row: dict[str, Any]) -> dict[str, float]:
    return {c: _ratio(lam) for c, lam in row["lambda"].items()}


def versus(summary: dict[str, Any], base: str) -> dict[str, list[dict[str, Any]]]:
    """Per other run and epoch both runs have: of the classes both have, how many have a
    higher |λmin/λmax| than in run ``base`` (``higher``) and which those are."""
    if base not in summary["runs"]:
        raise SystemExit(f"error: --versus {base}: runs are {', '.join(summary['runs'])}")
    base_rows = {row["epoch"]: _class_ratios(row) for row in summary["runs"][base]}
    out: dict[str, list[dict[str, Any]]] = {}
    for label, rows in summary["runs"].items():
        if label == base:
            continue
        out[label] = []
        for row in rows:
            if row["epoch"] not in base_rows:
                continue
            mine, theirs = _class_ratios(row), base_rows[row["epoch"]]
            shared = sorted(set(mine) & set(theirs), key=int)
            higher = [int(c) for c in shared if mine[c] > theirs[c]]
            out[label].append({"epoch": row["epoch"], "classes": len(shared), "higher": len(higher),
                               "higher_classes": higher})
    return out


def print_versus(counts: dict[str, list[dict[str, Any]]], base: str) -> None:
    for label, rows in counts.items():
        print(f"\nclasses where {label}'s |λmin/λmax| is higher than {base}'s, per epoch")
        print("  " + "  ".join(f"{r['epoch']}: {r['higher']}/{r['classes']}" for r in rows))


def _fmt(value: float | None) -> str:
    return "   —  " if value is None else f"{value:.4f}"


def print_table(summary: dict[str, Any], watch: int) -> None:
    print(f"head classes {summary['head']}, tail classes {summary['tail']}; mean |λmin/λmax|; class {watch} λmax / λmin")
    for label, rows in summary["runs"].items():
        print(f"\n{label}\n  epoch   head    tail    class {watch}")
        for row in rows:
            lam = row["lambda"].get(str(watch))
            lam_text = "—" if lam is None else f"{lam[0]:.2f} / {lam[1]:.3f}"
            print(f"  {row['epoch']:5d}  {_fmt(row['head_ratio'])}  {_fmt(row['tail_ratio'])}  {lam_text}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+",
                        help="results file(s) (.h5) of spectra sweep or spectra train --spectra-every, read as one")
    parser.add_argument("--group", type=positive(int), default=3, help="classes in the head and in the tail (default 3)")
    parser.add_argument("--watch", type=int, default=None, help="class whose λmax / λmin to print (default: the smallest)")
    parser.add_argument("--versus", metavar="RUN", default=None,
                        help="count, per epoch, the classes where each other run's ratio is higher than RUN's")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    args = parser.parse_args(argv)
    for path in args.results:
        if not path.is_file():
            raise SystemExit(f"error: {path} is not a file")
    summary = summarise(args.results, args.group)
    sizes = {int(c): n for c, n in summary["class_sizes"].items()}
    watch = min(sizes, key=lambda c: (sizes[c], -c)) if args.watch is None else args.watch
    if str(watch) not in summary["class_sizes"]:
        raise SystemExit(f"error: --watch {watch}: the file has classes {', '.join(summary['class_sizes'])}")
    if args.versus is not None:
        summary["versus"] = {"run": args.versus, "counts": versus(summary, args.versus)}
    print_table(summary, watch)
    if args.versus is not None:
        print_versus(summary["versus"]["counts"], args.versus)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
