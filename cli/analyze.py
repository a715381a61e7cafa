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
from typing import Any

import click

from spectra.analysis import analyse_checkpoint
from spectra.progress import progress_bar
from spectra.store import ResultRecord
from spectra.sweep import SPREADS, SweepEvent, open_writer_on_rank_zero, run_sweep

from .common import (
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


def _analyse(kind: str, checkpoint: str, classes: str, opts: dict[str, Any]) -> list[ResultRecord] | None:
    """Run ``kind`` on the classes of one checkpoint; store and return the records
    (None on torchrun ranks other than 0, which neither print nor write)."""
    settings = settings_from(kind, opts)
    with distributed_session(opts) as ctx, open_writer_on_rank_zero(opts.get("out")) as writer:
        records = analyse_checkpoint(
            checkpoint, classes, settings, data_options_from(opts), load_options_from(opts), progress=ctx.is_writer,
        )
        if writer is not None:
            for record in records:
                writer.write(record)
        return records if ctx.is_writer else None


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
        click.echo(f"stored {len(records)} entr{'y' if len(records) == 1 else 'ies'} in {opts['out']}")


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
    extra = [r for r in records if len(r.arrays["top"]) > 1 or len(r.arrays["bottom"]) > 1]
    if extra and not opts["as_json"]:
        for r in extra:
            click.echo(f"class {r.class_index}: top {', '.join(fmt(float(v)) for v in r.arrays['top'])}; "
                       f"bottom {', '.join(fmt(float(v)) for v in r.arrays['bottom'])}")


@_per_class_command("density", density_options, click.option(
    "--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
    help="Write a PNG of the density (one file per class, suffixed -class<C>, when several)."))
def density(checkpoint: str, classes: str, plot_path: str | None, **opts: Any) -> None:
    """Spectral density of per-class Hessians by stochastic Lanczos quadrature."""
    records = _analyse("density", checkpoint, classes, opts)
    if records is None:
        return
    if plot_path:
        from spectra.plots import plot_density

        target = Path(plot_path)
        for r in records:
            out = target if len(records) == 1 else target.with_name(f"{target.stem}-class{r.class_index}{target.suffix}")
            plot_density(r, out=out)
            click.echo(f"wrote {out}", err=True)

    def row(r: ResultRecord) -> list[Any]:
        p, a = r.provenance, r.arrays
        nodes, weights = a["nodes"], a["weights"]
        negative = float((weights * (nodes < 0)).sum(axis=1).mean())
        return [f"{p['class_index']} {p['class_name']}", p["num_samples"], float(p["loss"]), float(nodes.min()),
                float(nodes.max()), negative, float(p["sigma"]), p["num_matvecs"], f"{p['wall_time_s']:.1f}s"]

    _report(records, ["class", "n", "loss", "min node", "max node", "mass < 0", "sigma", "HVPs", "time"], row, opts)


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
    with distributed_session(opts) as ctx:
        if not ctx.is_writer:  # computes its share; rank 0 reports
            run_sweep(paths, out, classes=classes, kinds=kinds, settings=settings_from("eigs", opts),
                      data_options=data_options_from(opts), load_options=load_options_from(opts), spread=spread)
            return
        _sweep_and_report(paths, out, classes, kinds, as_json, spread, opts)


def _sweep_and_report(paths: tuple[str, ...], out: str, classes: str, kinds: list[str], as_json: bool,
                      spread: str, opts: dict[str, Any]) -> None:
    bar = progress_bar(total=None, desc="sweep", unit="job")

    def on_event(event: SweepEvent) -> None:
        if event.total and bar.total != event.total:
            bar.total = event.total
            bar.refresh()
        bar.update(1)
        label = f"epoch {event.epoch} class {event.class_index} {event.kind}"
        if event.status == "failed":
            bar.write(f"failed: {event.checkpoint} {label}: {event.message}", file=sys.stderr)
        elif event.status == "done" and event.record is not None and event.kind == "eigs":
            a = event.record.arrays
            bar.set_postfix_str(f"{label}: λmax {fmt(float(a['top'][0]))} λmin {fmt(float(a['bottom'][0]))}")

    try:
        summary = run_sweep(
            paths, out, classes=classes, kinds=kinds, settings=settings_from("eigs", opts),
            data_options=data_options_from(opts), load_options=load_options_from(opts), progress=on_event,
            spread=spread,
        )
    finally:
        bar.close()
    if as_json:
        emit_json({"out": out, "computed": summary.computed, "skipped": summary.skipped, "failed": summary.failed})
    else:
        click.echo(f"{out}: computed {summary.computed}, skipped {summary.skipped} (already stored), "
                   f"failed {len(summary.failed)}")
    if summary.failed:
        raise click.ClickException(f"{len(summary.failed)} job(s) failed; first: {summary.failed[0]}")
