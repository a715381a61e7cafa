"""Is a method's gain over a baseline larger than the seed-to-seed spread?
Groups finished runs by method (``config.json``), and per method reports the
final test accuracy (mean ± sample standard deviation over seeds), the tail
accuracy, and the mean of each run's last ``--last`` evaluations (less noisy
than one evaluation). Against ``--baseline`` it gives the difference of the
means, the range of the differences over every (run, baseline run) pair and
Welch's t-test of the final accuracies (two-sided; it needs two seeds on each
side): a difference is called established at p < 0.05, and with two seeds a
side that takes a difference several times the seed spread.

    python benchmarks/seed_spread.py benchmarks/results/cifar10lt_cpu_rows/* --baseline ce-drw

Runs compared must share the recipe (data set, epochs, architecture, batch
size, imbalance, precision) and the images: a difference is a one-line error,
because a bf16 run against an fp32 baseline would measure the precision, and a
run on a re-encoded copy the copy, not the method. The images are compared by
the SHA-256 of their pixels that ``summary.json`` records; a run that predates
it (no ``train_data_sha256``) is compared by its data root.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scipy import stats

# Settings that must agree between all runs compared (the method's own settings may differ).
SHARED_SETTINGS = ("dataset", "imbalance_ratio", "imbalance_profile", "data_seed", "arch", "epochs",
                   "batch_size", "lr", "weight_decay", "amp", "max_train_samples", "max_test_samples")


@dataclass
class Run:
    folder: Path
    method: str
    seed: int
    acc: float
    tail_acc: float
    evaluations: list[float]  # test accuracy of every evaluation, in epoch order
    settings: dict[str, Any]
    data_root: str
    data_sha256: tuple[str, str] | None  # (train, test) pixels and labels; None in runs that predate it


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: cannot read {path} ({type(exc).__name__}: {exc})") from None


def read_run(folder: Path) -> Run:
    """A finished run of ``spectra train`` (its config, summary and metrics)."""
    config = _read_json(folder / "config.json")
    summary = _read_json(folder / "summary.json")
    if summary.get("epochs_completed") != summary.get("epochs_planned"):
        raise SystemExit(f"error: {folder} stopped at epoch {summary.get('epochs_completed')} of "
                         f"{summary.get('epochs_planned')}; only finished runs are compared")
    evaluations = []
    try:
        with open(folder / "metrics.jsonl") as lines:
            for line in lines:
                record = json.loads(line)
                if record.get("acc") is not None:
                    evaluations.append(float(record["acc"]))
        final = summary["final"]
        shas = summary.get("train_data_sha256"), summary.get("test_data_sha256")
        return Run(folder, config["method"], int(config["seed"]), float(final["acc"]), float(final["tail_acc"]),
                   evaluations, {k: config.get(k) for k in SHARED_SETTINGS}, str(config.get("data_root")),
                   None if None in shas else (str(shas[0]), str(shas[1])))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"error: {folder} is not a finished spectra run ({type(exc).__name__}: {exc})") from None


def check_same_recipe(runs: list[Run]) -> None:
    first = runs[0]
    for run in runs[1:]:
        for key in SHARED_SETTINGS:
            if run.settings[key] != first.settings[key]:
                raise SystemExit(f"error: {run.folder} has {key}={run.settings[key]!r} but {first.folder} has "
                                 f"{first.settings[key]!r}; compare runs of one recipe")


def check_same_data(runs: list[Run]) -> None:
    """Every pair of runs saw the same images: equal pixel SHA-256s where both record them, else equal data roots."""
    for a, b in itertools.combinations(runs, 2):
        if a.data_sha256 is not None and b.data_sha256 is not None:
            if a.data_sha256 != b.data_sha256:
                raise SystemExit(f"error: {a.folder} and {b.folder} were trained or tested on different images (their "
                                 "train_data_sha256/test_data_sha256 differ); compare runs on one copy of the data")
        elif a.data_root != b.data_root:
            older = a if a.data_sha256 is None else b
            raise SystemExit(f"error: cannot tell whether {a.folder} and {b.folder} saw the same images: {older.folder} "
                             f"records no data SHA-256 (it predates it) and their data roots differ ({a.data_root}, "
                             f"{b.data_root})")


def _mean_sd(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None}


def method_table(runs: list[Run], last: int) -> dict[str, dict[str, Any]]:
    """Per method: seeds, final and tail accuracy, and the mean of the last ``last`` evaluations (mean ± sd)."""
    table: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(r.method for r in runs):
        group = sorted((r for r in runs if r.method == method), key=lambda r: r.seed)
        seeds = [r.seed for r in group]
        if len(set(seeds)) < len(seeds):
            raise SystemExit(f"error: two runs of {method} have the same seed ({seeds}); each seed once")
        table[method] = {"seeds": seeds, "acc": [r.acc for r in group], "final": _mean_sd([r.acc for r in group]),
                         "tail": _mean_sd([r.tail_acc for r in group]),
                         "last_evaluations": _mean_sd([statistics.fmean(r.evaluations[-last:]) for r in group])}
    return table


def against_baseline(table: dict[str, dict[str, Any]], baseline: str, alpha: float = 0.05) -> dict[str, dict[str, Any]]:
    """Per method: difference of mean final accuracy to the baseline's, the range over all run pairs and
    Welch's two-sided t-test (p None when either side has a single seed)."""
    if baseline not in table:
        raise SystemExit(f"error: no run of the baseline {baseline!r} among the runs ({', '.join(table)})")
    base = table[baseline]["acc"]
    out = {}
    for method, row in table.items():
        if method == baseline:
            continue
        pairs = [a - b for a in row["acc"] for b in base]
        p = None
        if len(row["acc"]) > 1 and len(base) > 1:
            p = float(stats.ttest_ind(row["acc"], base, equal_var=False).pvalue)
        out[method] = {"difference": row["final"]["mean"] - table[baseline]["final"]["mean"],
                       "pair_range": [min(pairs), max(pairs)], "welch_p": p,
                       "established": None if p is None else p < alpha}
    return out


def _verdict(d: dict[str, Any]) -> str:
    if d["welch_p"] is None:
        return "no test (one seed on a side)"
    return f"Welch p = {d['welch_p']:.2f}: " + ("established" if d["established"] else "not established")


def _fmt(stat: dict[str, Any]) -> str:
    return f"{stat['mean']:.2f}" + (f" ± {stat['sd']:.2f}" if stat["sd"] is not None else "")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+", help="finished run folders (config.json, summary.json, metrics.jsonl)")
    p.add_argument("--baseline", help="method the others are compared with (e.g. ce-drw)")
    p.add_argument("--last", type=int, default=4, help="evaluations averaged per run [default: 4]")
    p.add_argument("--json", type=Path, help="also write the tables as JSON")
    args = p.parse_args(argv)
    if args.last < 1:
        raise SystemExit("error: --last must be at least 1")
    missing = [str(path) for path in args.runs if not path.exists()]
    if missing:
        raise SystemExit(f"error: no such run folder: {', '.join(missing)}")
    runs = [read_run(folder) for folder in args.runs if folder.is_dir()]  # files a glob caught are skipped
    if not runs:
        raise SystemExit("error: none of the paths is a run folder")
    check_same_recipe(runs)
    check_same_data(runs)
    table = method_table(runs, args.last)
    print(f"| method | seeds | final acc (mean ± sd) | tail | mean of last {args.last} evaluations |")
    print("| --- | --- | --- | --- | --- |")
    for method, row in table.items():
        print(f"| {method} | {','.join(map(str, row['seeds']))} | {' / '.join(f'{a:.2f}' for a in row['acc'])} → "
              f"{_fmt(row['final'])} | {_fmt(row['tail'])} | {_fmt(row['last_evaluations'])} |")
    result: dict[str, Any] = {"methods": table}
    if args.baseline:
        diffs = against_baseline(table, args.baseline)
        result["against_baseline"] = {"baseline": args.baseline, **diffs}
        for method, d in diffs.items():
            lo, hi = d["pair_range"]
            print(f"{method} − {args.baseline}: {d['difference']:+.2f} (pairs {lo:+.2f} … {hi:+.2f}); {_verdict(d)}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
