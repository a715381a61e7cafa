"""``spectra eigs | density | trace | sweep``: per-class Hessian analyses of checkpoints.

``eigs``, ``density`` and ``trace`` analyse one checkpoint for the classes
given with ``--class`` (an index, a name, a comma-separated list or ``all``),
print a table (or JSON with ``--json``) and optionally store the results in
an HDF5 file (``--out``). ``sweep`` runs every checkpoint × class into a
results file and skips entries that are already stored with the same settings.

Under ``torchrun`` every command joins the process group (gloo on CPUs, NCCL
on GPUs, one GPU per rank); the ranks share each class's samples (``sweep
--spread jobs``: the jobs instead), and only rank 0 prints and writes.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import click

from spectra.analysis import AnalysisSettings, analyse_class, resolve_device
from spectra.checkpoints import CheckpointError, LoadedCheckpoint, load_checkpoint
from spectra.class_data import AnalysisError, DataCache, DataOptions, resolve_classes
from spectra.eigenvalues import MIN_PRODUCTS
from spectra.progress import progress_bar
from spectra.store import ResultRecord
from spectra.sweep import SPREADS, SweepEvent, expand_checkpoints, open_writer_on_rank_zero, run_sweep

from .common import (
    FigurePath,
    check_analysis_options,
    checkpoint_options,
    compose,
    compute_options,
    data_options,
    data_options_from,
    density_options,
    distributed_session,
    eigs_options,
    emit_json,
    fmt,
    format_table,
    handle_errors,
    load_options_from,
    output_options,
    record_to_json,
    settings_from,
    trace_options,
)

__all__ = ["eigs", "density", "trace", "sweep"]

_CLASS_HELP = "Class: an index, a name, a comma-separated list, or 'all'."


def _analyse(kind: str, checkpoint: str, classes: str, opts: dict[str, Any],
             on_record: Callable[[ResultRecord, int], None] | None = None) -> list[ResultRecord] | None:
    """Run ``kind`` on the classes of one checkpoint; store and return the records
    (None on torchrun ranks other than 0, which neither print nor write).

    Every class is resolved and checked (it exists and has samples) before any
    product is computed; each class's record is committed to ``--out`` (and
    handed to ``on_record``) as soon as it is done, so an error in a later class
    or a Ctrl-C keeps the finished ones. ``on_record(record, number of classes)``
    runs on the writing rank only.
    """
    check_analysis_options(opts, [kind])
    settings = settings_from(kind, opts)
    data_options = data_options_from(opts)
    with distributed_session(opts) as ctx:
        loaded = load_options_from(opts)
        ckpt = load_checkpoint(checkpoint, loaded.arch, loaded.arch_kwargs, loaded.trust)
        cache = DataCache(data_options)
        wanted = _classes_with_samples(ckpt, classes, cache)
        device = resolve_device(data_options.device)
        with open_writer_on_rank_zero(opts.get("out")) as writer:
            records: list[ResultRecord] = []
            try:
                _analyse_classes(ckpt, wanted, settings, cache, data_options, device, ctx.is_writer,
                                 records, writer, on_record)
            except BaseException:  # an error or Ctrl-C in a later class: say what was kept
                if writer is not None and records:
                    click.echo(f"stored {_entries(len(records))} (the finished classes) in {opts['out']}", err=True)
                raise
        return records if ctx.is_writer else None


def _classes_with_samples(ckpt: LoadedCheckpoint, classes: str, cache: DataCache) -> list[int]:
    """The wanted class indices; every one exists and has samples (else AnalysisError)."""
    source = cache.source(ckpt)
    wanted = resolve_classes(classes, source.class_names)
    for c in wanted:
        if source.class_counts[c] == 0:
            cache.class_data(ckpt, c)  # raises the data layer's "class c (name) has no samples in ..."
            raise AnalysisError(f"class {c} has no samples")
    return wanted


def _analyse_classes(ckpt: LoadedCheckpoint, wanted: list[int], settings: AnalysisSettings, cache: DataCache,
                     data_options: DataOptions, device: Any, show: bool, records: list[ResultRecord],
                     writer: Any, on_record: Callable[[ResultRecord, int], None] | None) -> None:
    """Analyse each class in turn, appending to ``records`` and committing each at once."""
    source = cache.source(ckpt)
    bar = progress_bar(total=len(wanted), desc=settings.kind, unit="class", enabled=show)
    try:
        for c in wanted:
            bar.set_postfix_str(f"class {c} {source.class_names[c]}")
            record = analyse_class(
                ckpt, cache.class_data(ckpt, c), settings, device, data_options.batch_size,
                source.description, cache.identity(ckpt), source.class_counts, progress=show,
            )
            if writer is not None:
                writer.write(record)
            records.append(record)
            if on_record is not None and show:
                on_record(record, len(wanted))
            bar.update(1)
    finally:
        bar.close()


def _entries(n: int) -> str:
    return f"{n} entr{'y' if n == 1 else 'ies'}"


def _header(record: ResultRecord) -> str:
    p = record.provenance
    data = p["dataset"].get("name") or p["dataset"].get("factory", "?")
    restricted = f", params {','.join(p['params'])}" if p.get("params") else ""
    return (
        f"{Path(p['checkpoint_path']).name}: {p['checkpoint_format']} checkpoint, {p['model']}, epoch {p['epoch']}"
        f" | {data} {p['split']} | loss {p['loss_fn']} | {p['dtype']} on {p['device']}"
        f" | {p['num_params']} parameters{restricted}"
    )


def _report(records: list[ResultRecord], headers: list[str], row: Any, opts: dict[str, Any]) -> None:
    if opts["as_json"]:
        emit_json([record_to_json(r) for r in records])
        return
    click.echo(_header(records[0]))
    click.echo(format_table(headers, [row(r) for r in records]))
    if opts.get("out"):
        click.echo(f"stored {_entries(len(records))} in {opts['out']}")


def _per_class_command(name: str, *own_options: Any) -> Any:
    """The decorators every single-checkpoint analysis shares, around its own options."""
    return compose(click.command(name), click.argument("checkpoint", type=click.Path(dir_okay=False)),
                   click.option("--class", "classes", required=True, help=_CLASS_HELP), *own_options,
                   checkpoint_options, data_options, compute_options, output_options, handle_errors)


@_per_class_command("eigs", eigs_options)
def eigs(checkpoint: str, classes: str, **opts: Any) -> None:
    """Extreme eigenvalues (λmax, λmin) of per-class Hessians, with residuals."""
    records = _analyse("eigs", checkpoint, classes, opts)
    if records is None:
        return

    def row(r: ResultRecord) -> list[Any]:
        p, a = r.provenance, r.arrays
        top = float(a["top"][0]) if len(a["top"]) else None
        bottom = float(a["bottom"][0]) if len(a["bottom"]) else None
        ratio = abs(bottom / top) if top and bottom is not None else None
        residual = max([float(x) for x in list(a["top_residuals"]) + list(a["bottom_residuals"])] or [0.0])
        return [f"{p['class_index']} {p['class_name']}", p["num_samples"], float(p["loss"]), top, bottom, ratio,
                residual, "yes" if p.get("converged") else "NO", p["num_matvecs"], f"{p['wall_time_s']:.1f}s"]

    _report(records, ["class", "n", "loss", "λmax", "λmin", "|λmin/λmax|", "max residual", "converged",
                      "HVPs", "time"], row, opts)
    if not opts["as_json"] and any(not r.provenance.get("converged") for r in records):
        click.echo(f"converged NO: a measured residual is above tol·max|λ|, or fewer than {MIN_PRODUCTS} products "
                   "went into the recurrence (too few to trust λmin); raise --max-iter (or loosen --tol)", err=True)
    extra = [r for r in records if len(r.arrays["top"]) > 1 or len(r.arrays["bottom"]) > 1]
    if extra and not opts["as_json"]:
        for r in extra:
            click.echo(f"class {r.class_index}: top {', '.join(fmt(float(v)) for v in r.arrays['top'])}; "
                       f"bottom {', '.join(fmt(float(v)) for v in r.arrays['bottom'])}")


def negative_mass(record: ResultRecord) -> float:
    """Share of the spectrum below −σ (the density's kernel width), averaged over probes: the
    quadrature weight of nodes < −σ. Eigenvalues within σ of 0 are the bulk at that resolution,
    whichever side of 0 rounding puts its nodes on."""
    nodes, weights = record.arrays["nodes"], record.arrays["weights"]
    return float((weights * (nodes < -float(record.provenance["sigma"]))).sum(axis=1).mean())


@_per_class_command("density", density_options, click.option(
    "--plot", "plot_path", type=FigurePath(), default=None,
    help="Write a figure of the density, format from the suffix (png, pdf, svg, ...); one file per class, "
         "suffixed -class<C>, when several classes are asked for."))
def density(checkpoint: str, classes: str, plot_path: str | None, **opts: Any) -> None:
    """Spectral density of per-class Hessians by stochastic Lanczos quadrature."""
    records = _analyse("density", checkpoint, classes, opts,
                       on_record=(lambda r, n: _plot_density(r, Path(plot_path), n > 1)) if plot_path else None)
    if records is None:
        return

    def row(r: ResultRecord) -> list[Any]:
        p, a = r.provenance, r.arrays
        nodes = a["nodes"]
        return [f"{p['class_index']} {p['class_name']}", p["num_samples"], float(p["loss"]), float(nodes.min()),
                float(nodes.max()), negative_mass(r), float(p["sigma"]), p["num_matvecs"], f"{p['wall_time_s']:.1f}s"]

    _report(records, ["class", "n", "loss", "min node", "max node", "mass < -sigma", "sigma", "HVPs", "time"], row, opts)


def _plot_density(record: ResultRecord, target: Path, several: bool) -> None:
    """Plot one class's density as soon as it is computed (``target`` checked up front)."""
    from spectra.plots import plot_density

    out = target.with_name(f"{target.stem}-class{record.class_index}{target.suffix}") if several else target
    plot_density(record, out=out)
    click.echo(f"wrote {out}", err=True)


@_per_class_command("trace", trace_options)
def trace(checkpoint: str, classes: str, **opts: Any) -> None:
    """Trace of per-class Hessians (Hutch++ or Hutchinson) with its standard error."""
    records = _analyse("trace", checkpoint, classes, opts)
    if records is None:
        return

    def row(r: ResultRecord) -> list[Any]:
        p, a = r.provenance, r.arrays
        estimate, stderr = float(a["estimate"]), float(a["stderr"])
        return [f"{p['class_index']} {p['class_name']}", p["num_samples"], float(p["loss"]), estimate, stderr,
                estimate / p["num_params"], p["num_matvecs"], f"{p['wall_time_s']:.1f}s"]

    _report(records, ["class", "n", "loss", "trace", "stderr", "trace/d", "HVPs", "time"], row, opts)


@click.command("sweep")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--classes", "--class", "classes", default="all", show_default=True, help=_CLASS_HELP)
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), metavar="RESULTS.h5",
              help="HDF5 results file (created, or extended and resumed).")
@click.option("--density/--no-density", "with_density", default=False, help="Also compute spectral densities.")
@click.option("--trace/--no-trace", "with_trace", default=False, help="Also compute traces.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary (only that) on stdout.")
@click.option("--spread", type=click.Choice(SPREADS), default="samples", show_default=True,
              help="Under torchrun: share each class's samples over the ranks, or deal whole "
                   "(checkpoint, class) jobs to them (rank 0 writes either way).")
@eigs_options
@density_options
@trace_options
@checkpoint_options
@data_options
@compute_options
@handle_errors
def sweep(paths: tuple[str, ...], classes: str, out: str, with_density: bool, with_trace: bool,
          as_json: bool, spread: str, **opts: Any) -> None:
    """Every checkpoint × class into RESULTS.h5; reruns skip stored entries.

    PATHS are checkpoint files or run folders (their ckpt_epoch*.pt files, and
    last.pt when its epoch is not covered). Each entry is committed as soon as
    it is computed: an interrupted sweep keeps everything finished before.
    """
    kinds = ["eigs"] + (["density"] if with_density else []) + (["trace"] if with_trace else [])
    check_analysis_options(opts, kinds)
    settings_from("eigs", opts)  # settings errors before anything is read or created
    jobs = _count_jobs(expand_checkpoints(paths), classes, kinds, opts)
    with distributed_session(opts) as ctx:
        if not ctx.is_writer:  # computes its share; rank 0 reports
            run_sweep(paths, out, classes=classes, kinds=kinds, settings=settings_from("eigs", opts),
                      data_options=data_options_from(opts), load_options=load_options_from(opts), spread=spread)
            return
        _sweep_and_report(paths, out, classes, kinds, as_json, spread, opts, jobs)


def _count_jobs(files: list[Path], classes: str, kinds: list[str], opts: dict[str, Any]) -> int | None:
    """Jobs of the sweep (checkpoints × classes × kinds), with ``classes`` checked
    against the first readable checkpoint's class names: an unknown class is
    an error before any job runs or the results file is created. None when no
    checkpoint can be read (the sweep then reports each one as failed)."""
    loaded = load_options_from(opts)
    for path in files:
        try:
            ckpt = load_checkpoint(path, loaded.arch, loaded.arch_kwargs, loaded.trust)
        except (CheckpointError, OSError, ValueError):
            continue
        return len(files) * len(resolve_classes(classes, _class_names(ckpt, data_options_from(opts)))) * len(kinds)
    return None


def _class_names(ckpt: LoadedCheckpoint, data_options: DataOptions) -> list[str]:
    """The checkpoint's class names when it records them for its own data set, else the data set's."""
    if ckpt.class_names and data_options.dataset is None:
        return list(ckpt.class_names)
    return DataCache(data_options).source(ckpt).class_names


def _sweep_and_report(paths: tuple[str, ...], out: str, classes: str, kinds: list[str], as_json: bool,
                      spread: str, opts: dict[str, Any], jobs: int | None) -> None:
    bar = progress_bar(total=jobs, desc="sweep", unit="job")

    def on_event(event: SweepEvent) -> None:
        if event.total and bar.total != event.total:
            bar.total = event.total
            bar.refresh()
        bar.update(1)
        if event.status == "failed":
            where = f" epoch {event.epoch} class {event.class_index} {event.kind}" if event.class_index >= 0 else ""
            bar.write(f"failed: {event.checkpoint}{where}: {event.message}", file=sys.stderr)
        elif event.status == "done" and event.record is not None and event.kind == "eigs":
            bar.set_postfix_str(f"epoch {event.epoch} class {event.class_index}: {_extremes(event.record)}")

    try:
        summary = run_sweep(
            paths, out, classes=classes, kinds=kinds, settings=settings_from("eigs", opts),
            data_options=data_options_from(opts), load_options=load_options_from(opts), progress=on_event,
            spread=spread,
        )
    finally:
        bar.close()
    if as_json:
        emit_json({"out": out, "computed": summary.computed, "skipped": summary.skipped, "copied": summary.copied,
                   "failed": summary.failed})
    else:
        copied = f", copied {summary.copied} (byte-identical checkpoints of other runs)" if summary.copied else ""
        click.echo(f"{out}: computed {summary.computed}, skipped {summary.skipped} (already stored){copied}, "
                   f"failed {len(summary.failed)}")
    if summary.failed:
        raise click.ClickException(f"{len(summary.failed)} job(s) failed; first: {summary.failed[0]}")


def _extremes(record: ResultRecord) -> str:
    """λmax / λmin of an eigs record, each only when it was asked for (--top-k/--bottom-k 0)."""
    a = record.arrays
    parts = [f"{name} {fmt(float(a[key][0]))}" for name, key in (("λmax", "top"), ("λmin", "bottom")) if len(a[key])]
    return " ".join(parts)
