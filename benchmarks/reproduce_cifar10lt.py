"""Reproduce the paper's CIFAR-10-LT table: the eight methods as concurrent
``spectra train`` processes on one device, then a table of final overall and
tail accuracy beside the paper's numbers.

    python benchmarks/reproduce_cifar10lt.py --data-root DIR --out runs/table --epochs 200 --parallel 8 --time-budget-s 500
    python benchmarks/reproduce_cifar10lt.py --data-root DIR --out /tmp/dry --epochs 1 --max-train-samples 256 --device cpu   # dry run

On CUDA the runs share one process by default (``--mode streams``: each run on
its own CUDA stream, steps interleaved, so the small kernels of eight
ResNet-32s overlap on the GPU). ``--mode ensemble`` trains the runs that share
an architecture and optimiser as ONE vectorised step (``torch.func.vmap``;
groups {ce, ce-drw, vs}, {ce-sam, ce-drw-sam, vs-sam}, {ldam-drw},
{ldam-drw-sam}), the four groups on their own streams; its GPU speed is not
measured yet, so it is not the default. ``--mode processes`` starts one
``spectra train`` process per run instead, and is the automatic fallback.

"Tail" = the 3 rarest classes (7 horse, 8 ship, 9 truck: 139, 83, 50 training
images). Each run gets ``--time-limit-s`` = the budget minus a margin, so a run
that cannot finish stops cleanly with a checkpoint and a summary marked
``stopped_early`` (its numbers are then *not* comparable to the paper's).
Writes ``OUT/results.json`` and ``OUT/results.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import positive  # noqa: E402

# (method, paper overall acc, paper tail acc): CIFAR-10-LT, ratio 100, mean over seeds
PAPER = [
    ("ce", 71.7, 52.3),
    ("ce-sam", 73.1, 51.7),
    ("ce-drw", 75.5, 61.4),
    ("ce-drw-sam", 80.6, 73.1),
    ("ldam-drw", 77.5, 66.4),
    ("ldam-drw-sam", 81.9, 76.4),
    ("vs", 78.6, 70.3),
    ("vs-sam", 82.4, 78.0),
]
BASELINES = [("ce-drw-pgd", 77.2, 65.0), ("ce-drw-lpf", 78.5, 67.2)]
MARGIN_S = 25.0  # time kept for the last epoch past the limit, the final evaluation, checkpoint and summary
T0 = time.time()


def command(method: str, args: argparse.Namespace, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "spectra", "train", "--method", method, "--dataset", "cifar10-lt",
           "--data-root", args.data_root, "--out", str(out), "--epochs", str(args.epochs), "--seed", str(args.seed),
           "--device", args.device, "--no-progress", "--eval-every", str(args.eval_every), "--save-every", str(save_every(method, args))]
    if args.compile:
        cmd += ["--compile", args.compile]
    if args.amp:
        cmd += ["--amp", args.amp]
    if args.max_train_samples is not None:
        cmd += ["--max-train-samples", str(args.max_train_samples)]
    if args.max_test_samples is not None:
        cmd += ["--max-test-samples", str(args.max_test_samples)]
    if args.time_budget_s is not None:
        cmd += ["--time-limit-s", str(max(1.0, args.time_budget_s - MARGIN_S))]
    for item in args.set:
        cmd += ["--set", item]
    return cmd


def save_every(method: str, args: argparse.Namespace) -> int:
    """The run's snapshot interval: its ``--save-every-for`` entry, else ``--save-every``."""
    return dict(args.save_every_for).get(method, args.save_every)


def method_interval(text: str) -> tuple[str, int]:
    """argparse type of ``--save-every-for``: ``METHOD=N`` with N a positive integer."""
    method, sep, value = text.partition("=")
    if not sep or not method.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected METHOD=N with N a positive integer, got {text!r}")
    return method.strip(), positive(int)(value.strip())


def build_configs(methods: list[str], args: argparse.Namespace) -> list:
    """The runs' TrainConfigs for the in-process modes."""
    from spectra.train import parse_override, resolve_config

    overrides = dict(parse_override(item) for item in args.set)
    configs = []
    for m in methods:
        configs.append(resolve_config(
            m, "cifar10-lt", new_run=not args.resume, data_root=args.data_root, epochs=args.epochs, seed=args.seed, device=args.device,
            progress=False, eval_every=args.eval_every, save_every=save_every(m, args),
            max_train_samples=args.max_train_samples, max_test_samples=args.max_test_samples,
            time_limit_s=max(1.0, args.time_budget_s - MARGIN_S) if args.time_budget_s is not None else None,
            **({"compile": args.compile} if args.compile else {}), **({"amp": args.amp} if args.amp else {}), **overrides,
        ))
    return configs


def refuse_existing_runs(methods: list[str], args: argparse.Namespace) -> None:
    """Never train over a run's files without --resume (the check `spectra train` makes)."""
    from spectra.train.run_folder import check_out_dir_is_free

    if args.resume:
        return
    for m in methods:
        try:
            check_out_dir_is_free(Path(args.out) / m)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None


def run_in_process(methods: list[str], args: argparse.Namespace, mode: str) -> dict[str, dict]:
    """All runs in this process, lockstep. ``streams``: one CUDA stream per run
    (spectra.train.fit_many); ``ensemble``: runs that share an architecture
    and optimiser trained as one vectorised step per group, the groups on
    their own streams (spectra.train.fit_ensembles)."""
    from spectra.train import fit_ensembles, fit_many, group_for_ensembles

    configs = build_configs(methods, args)
    out_dirs = [Path(args.out) / m for m in methods]
    t0 = time.time()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if mode == "ensemble":
        groups = ["{" + ", ".join(methods[i] for i in g) + "}" for g in group_for_ensembles(configs)]
        print(f"training {' '.join(groups)} in one process on {args.device} (one vectorised ensemble per group, "
              "groups on their own CUDA streams)", flush=True)
        fit_ensembles(configs, out_dirs, resume=args.resume, log=log)
    else:
        print(f"training {', '.join(methods)} in one process on {args.device} (one CUDA stream per run)", flush=True)
        fit_many(configs, out_dirs, resume=args.resume, log=log)
    return {m: {"returncode": 0, "wall_s": time.time() - t0, "mode": mode} for m in methods}


def watch(cmd: list[str], stall_s: float) -> None:
    """Run ``cmd``, relaying its output; kill it when it prints nothing for
    ``stall_s`` seconds. Raises RuntimeError on a stall or a non-zero exit."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines: queue.Queue = queue.Queue()

    def relay() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=relay, daemon=True).start()
    last = time.time()
    while True:
        try:
            line = lines.get(timeout=min(1.0, stall_s))
        except queue.Empty:
            if time.time() - last > stall_s:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"no progress for {stall_s:.0f} s; killed the in-process run")
            continue
        if line is None:
            break
        last = time.time()
        print(line, end="", flush=True)
    if proc.wait() != 0:
        raise RuntimeError(f"the in-process run exited with code {proc.returncode}")


def run_watched(methods: list[str], args: argparse.Namespace, mode: str) -> dict[str, dict]:
    """:func:`run_in_process` in a watched child process (:func:`watch`). A GPU
    hang blocks the host in a synchronisation forever (seen on an H200
    before the capture-stream fix), and no exception would ever reach the
    fallback; what the child wrote stays for the fallback to resume."""
    t0 = time.time()
    watch([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--mode", mode, "--in-process-child"], args.stall_s)
    return {m: {"returncode": 0, "wall_s": time.time() - t0, "mode": mode} for m in methods}


def run_all(methods: list[str], args: argparse.Namespace) -> dict[str, dict]:
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # Concurrent processes share the host's cores: one BLAS/OpenMP thread each
    # unless the caller set a value.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, args.parallel))))
    pending = list(methods)
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    status: dict[str, dict] = {}
    t0 = time.time()
    hard_stop = (args.time_budget_s + 60.0) if args.time_budget_s else None
    while pending or running:
        while pending and len(running) < args.parallel:
            m = pending.pop(0)
            run_dir = out_root / m
            log = open(out_root / f"{m}.log", "a")
            cmd = command(m, args, run_dir) + (["--resume"] if args.resume else [])
            print("$ " + " ".join(cmd), flush=True)
            running[m] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.time(), log)
        time.sleep(1.0)
        for m, (proc, start, log) in list(running.items()):
            rc = proc.poll()
            if rc is None and hard_stop is not None and time.time() - t0 > hard_stop:
                proc.kill()
                rc = proc.wait()
                print(f"{m}: killed at the hard time limit", flush=True)
            if rc is not None:
                log.close()
                status[m] = {"returncode": rc, "wall_s": time.time() - start}
                print(f"{m}: exit {rc} after {time.time() - start:.0f} s", flush=True)
                del running[m]
    return status


def read_summary(run_dir: Path) -> dict | None:
    """The run's ``summary.json`` (None when it has none yet)."""
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def finished(run_dir: Path, epochs: int) -> bool:
    """The run's summary says it trained all ``epochs`` (a run stopped by its time limit has one too)."""
    try:
        summary = read_summary(run_dir) or {}
    except (OSError, ValueError):
        return False
    return not summary.get("stopped_early") and (summary.get("epochs_completed") or 0) >= epochs


def fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


def table(methods: list[str], status: dict[str, dict], args: argparse.Namespace) -> tuple[list[dict], str]:
    paper = {m: (a, t) for m, a, t in PAPER + BASELINES}
    rows = []
    for m in methods:
        s = read_summary(Path(args.out) / m)
        final = (s or {}).get("final") or {}
        best = (s or {}).get("best") or {}
        pa, pt = paper.get(m, (None, None))
        acc, tail = final.get("acc"), final.get("tail_acc")
        rows.append({
            "method": m, "paper_acc": pa, "paper_tail": pt, "acc": acc, "tail_acc": tail,
            "delta_acc": None if acc is None or pa is None else acc - pa,
            "delta_tail": None if tail is None or pt is None else tail - pt,
            "best_acc": best.get("acc"), "best_epoch": best.get("epoch"),
            "epochs": (s or {}).get("epochs_completed"), "epochs_planned": args.epochs,
            "stopped_early": (s or {}).get("stopped_early"), "s_per_epoch": (s or {}).get("seconds_per_epoch"),
            "wall_s": status.get(m, {}).get("wall_s"), "returncode": status.get(m, {}).get("returncode"),
            "device": (s or {}).get("device"), "tail_classes": (s or {}).get("tail_classes"),
            "command": " ".join(command(m, args, Path(args.out) / m)[1:]).replace("-m spectra", "spectra", 1),
        })
    lines = [
        "| method | paper acc | ours acc | Δ | paper tail | ours tail | Δ | best acc (epoch) | epochs | s/epoch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        epochs = f"{r['epochs']}/{r['epochs_planned']}" + (" (stopped)" if r["stopped_early"] else "")
        lines.append(
            f"| {r['method']} | {fmt(r['paper_acc'])} | {fmt(r['acc'])} | {fmt(r['delta_acc'])} | {fmt(r['paper_tail'])} | "
            f"{fmt(r['tail_acc'])} | {fmt(r['delta_tail'])} | {fmt(r['best_acc'])} ({r['best_epoch']}) | {epochs} | "
            f"{'—' if r['s_per_epoch'] is None else format(r['s_per_epoch'], '.2f')} |"
        )
    device = next((r["device"] for r in rows if r["device"]), "?")
    lines.append("")
    lines.append(f"Tail = classes {rows[0]['tail_classes']} (the 3 rarest). Device: {device}. Data: {args.data_root}.")
    return rows, "\n".join(lines)


def repeated(items: list[str]) -> list[str]:
    """The items that occur more than once, sorted."""
    return sorted({item for item in items if items.count(item) > 1})


def check_runs(p: argparse.ArgumentParser, methods: list[str], args: argparse.Namespace) -> None:
    """Refuse an empty or unknown method list and any setting a run would refuse, before anything starts."""
    from spectra.train import METHODS

    if not methods:
        p.error("--methods lists no method")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; expected some of {', '.join(METHODS)}")
    if repeated(methods):  # two runs would train into one folder
        p.error(f"--methods lists {', '.join(repeated(methods))} more than once")
    named = [m for m, _ in args.save_every_for]
    stray = [m for m in named if m not in methods]
    if stray:
        p.error(f"--save-every-for names {', '.join(stray)}, not among --methods {', '.join(methods)}")
    if repeated(named):
        p.error(f"--save-every-for gives {', '.join(repeated(named))} more than once")
    try:
        build_configs(methods, args)
    except ValueError as exc:
        p.error(str(exc).splitlines()[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=positive(int), default=200)
    p.add_argument("--parallel", type=positive(int), default=8, help="concurrent training processes (processes mode)")
    p.add_argument("--mode", choices=["auto", "streams", "ensemble", "processes"], default="auto",
                   help="streams: all runs in one process, one CUDA stream each (kernels overlap; default on CUDA); "
                        "ensemble: compatible runs as one vectorised step per group (4 groups for the table), groups on streams; "
                        "processes: one 'spectra train' process per run (default on CPU; fallback if an in-process mode fails)")
    p.add_argument("--time-budget-s", type=positive(float), default=None, help="stop every run cleanly before this many seconds")
    p.add_argument("--methods", default=",".join(m for m, _, _ in PAPER), help="comma list (add ce-drw-pgd,ce-drw-lpf for the baselines)")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", default=None, help="passed to spectra train --compile (default: auto)")
    p.add_argument("--amp", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=positive(int), default=1)
    p.add_argument("--save-every", type=positive(int), default=10)
    p.add_argument("--save-every-for", type=method_interval, action="append", default=[], metavar="METHOD=N",
                   help="this method's --save-every (e.g. ce-drw-pgd=200: no snapshots beside epoch 1 and the last)")
    p.add_argument("--max-train-samples", type=positive(int), default=None, help="dry runs: train on about N images")
    p.add_argument("--max-test-samples", type=positive(int), default=None, help="dry runs: evaluate on about N images")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to every run")
    p.add_argument("--resume", action="store_true", help="continue the runs in --out")
    p.add_argument("--stall-s", type=positive(float), default=90.0,
                   help="in-process modes: kill the run and fall back to processes after this long without output")
    p.add_argument("--in-process-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.in_process_child:  # started by run_watched: train, and let the parent report
        run_in_process(methods, args, args.mode)
        return
    check_runs(p, methods, args)
    refuse_existing_runs(methods, args)
    mode = args.mode
    if mode == "auto":
        import torch

        mode = "streams" if args.device != "cpu" and torch.cuda.is_available() else "processes"
    if mode in ("streams", "ensemble"):
        try:
            status = run_watched(methods, args, mode)
        except Exception as exc:  # fall back to one process per run, resuming what exists
            print(f"in-process run failed ({type(exc).__name__}: {exc}); falling back to one process per run", flush=True)
            left = [m for m in methods if not finished(Path(args.out) / m, args.epochs)]
            if args.time_budget_s:
                args.time_budget_s = max(60.0, args.time_budget_s - (time.time() - T0))
            args.resume = True
            status = {m: {"returncode": 0, "mode": mode} for m in methods if m not in left}
            status.update(run_all(left, args))
    else:
        status = run_all(methods, args)
    rows, md = table(methods, status, args)
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps({"rows": rows, "status": status}, indent=2) + "\n")
    (out / "results.md").write_text(md + "\n")
    print(md)
    failed = [m for m, s in status.items() if s["returncode"] != 0]
    if failed:
        raise SystemExit(f"failed runs: {', '.join(failed)} (see {out}/<method>.log)")


if __name__ == "__main__":
    main()
