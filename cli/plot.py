"""``spectra plot ratio | density``: figures of results files, written as images."""
from __future__ import annotations

import os

import click

from spectra import results_query, store
from spectra.class_data import resolve_classes
from spectra.plots import image_path, missing_extremes, plot_density, plot_ratio
from spectra.train.spectra_probe import RESULTS_FILE

from .common import handle_errors

__all__ = ["plot"]

_RUN_HELP = ("a run's name, or when two checkpoint folders share a name, the label `spectra info` shows "
             "(seedA/ce-drw) or the folder's path")


def results_files(paths: tuple[str, ...]) -> tuple[str, ...]:
    """The results files named by ``paths``: a file as given; a folder means its
    ``results.h5`` (a run folder of ``spectra train --spectra-every N``)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            path = os.path.join(path, RESULTS_FILE)
            if not os.path.isfile(path):
                raise click.ClickException(f"{os.path.dirname(path)} is a folder without {RESULTS_FILE} "
                                           "(train with --spectra-every N, or give a results file)")
        files.append(path)
    return tuple(files)


@click.group("plot")
def plot() -> None:
    """Figures of results files (PNG, PDF or SVG by the output's suffix; PNG without one)."""


@plot.command("ratio")
@click.argument("results", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False), help="Image to write.")
@click.option("--run", "runs", multiple=True,
              help=f"Runs (checkpoint folders) to show, one panel each; default all. A run is {_RUN_HELP}.")
@click.option("--log/--linear", "log_scale", default=None, help="Y axis scale (default: log when ratios span >2 decades).")
@click.option("--title", default=None)
@handle_errors
def ratio(results: tuple[str, ...], output: str, runs: tuple[str, ...], log_scale: bool | None,
          title: str | None) -> None:
    """|λmin/λmax| per class over epochs: one line per class, head (blue) to tail (red).

    Several RESULTS files are read as one; a run folder stands for the
    results.h5 that `spectra train --spectra-every N` writes in it:
    `spectra plot ratio runs/ce-drw runs/ce-drw-sam -o ratio.png`."""
    target = image_path(output)
    results = results_files(results)
    if runs:
        chosen = list(dict.fromkeys(results_query.find_run(results, run).label for run in runs))
    else:
        chosen = results_query.runs(results, kind="eigs")
        if not chosen:
            _refuse_without(results, "eigenvalue (eigs)", "the ratio needs `spectra eigs` or `spectra sweep` results")
    entries = {run: results_query.newest_eigs_entries(results, run) for run in chosen}
    tables = {run: results_query.eigen_table_of(newest) for run, newest in entries.items()}
    names = results_query.class_names(results)
    for note in missing_extremes(tables, names):
        click.echo(f"note: {note}", err=True)
    differ = results_query.settings_differences(r for newest in entries.values() for r in newest.values())
    if differ:
        click.echo(f"note: the figure mixes entries computed with different settings ({', '.join(differ)}); each point "
                   "is the newest entry of its run, epoch and class", err=True)
    plot_ratio(tables, names, results_query.class_sizes(results), out=target, log_scale=log_scale, title=title)
    click.echo(f"wrote {target}")


@plot.command("density")
@click.argument("results", nargs=-1, required=True, type=click.Path())
@click.option("--class", "class_spec", required=True,
              help="Class: an index, a name, a comma-separated list or 'all' (one curve each).")
@click.option("--epoch", "epochs", type=int, multiple=True, required=True,
              help="Epoch of the checkpoint (repeat to overlay several).")
@click.option("--run", "runs", multiple=True,
              help=f"Run when the file holds several (repeat to overlay runs, e.g. ce-drw and ce-drw-sam): {_RUN_HELP}.")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False), help="Image to write.")
@handle_errors
def density(results: tuple[str, ...], class_spec: str, epochs: tuple[int, ...], runs: tuple[str, ...], output: str) -> None:
    """Spectral density of classes at epochs (of runs) (log scale), one curve each;
    with λmin/λmax when one class at one epoch of one run is shown and an eigs
    entry of the same Hessian exists (same checkpoint, class, samples, --params,
    --loss, --dtype). Several RESULTS files are read as one (a run folder: its results.h5)."""
    target = image_path(output)
    results = results_files(results)
    if not results_query.runs(results, kind="density"):
        _refuse_without(results, "density", "the plot needs `spectra density` or `spectra sweep --density` results")
    names = results_query.class_names(results)
    ordered = [names.get(i, str(i)) for i in range(max(names) + 1)] if names else []
    found = [results_query.find_run(results, run) for run in runs]
    chosen = list(dict.fromkeys(run.label for run in found)) or [None]  # a run given twice: once
    if class_spec.strip().lower() == "all":  # the classes with a density entry at those epochs in every chosen run
        keys = {run.key for run in found}
        have = {(r.run_key, r.epoch, r.class_index) for r in store.read_results(results, kind="density")
                if not keys or r.run_key in keys}
        in_file = {run_key for run_key, _, _ in have}
        classes = sorted(c for c in {c for _, _, c in have}
                         if all((run_key, e, c) in have for run_key in in_file for e in epochs))
    else:
        classes = resolve_classes(class_spec, ordered)
    records = [results_query.density_record(results, c, e, run=run) for run in chosen for c in classes for e in epochs]
    runs = [results_query.run_of(results, r) for r in records]
    labels = [f"{run_.label} epoch {r.epoch}, class {r.class_index} ({r.provenance.get('class_name', '')})"
              for run_, r in zip(runs, records)]
    extremes = _extremes(results, records[0]) if len(records) == 1 else None
    plot_density(records, out=target, extremes=extremes, labels=labels)
    click.echo(f"wrote {target}")


def _refuse_without(results: tuple[str, ...], kind: str, needs: str) -> None:
    """One-line error for files holding no entry of ``kind`` (naming what they do hold)."""
    kinds = sorted({r.kind for r in store.read_results(results)})
    raise click.ClickException(f"{store.describe_files(results)} holds no {kind} entries "
                               f"(it holds: {', '.join(kinds) or 'nothing'}); {needs}")


def _extremes(results: tuple[str, ...], record: store.ResultRecord) -> tuple[float, float] | None:
    """(λmin, λmax) from an eigs entry of the same Hessian as the density ``record``
    (checkpoint, class, samples, params, loss, dtype: :func:`results_query.same_hessian_eigs`), if any."""
    eigs = results_query.same_hessian_eigs(results, record)
    if eigs is None:
        return None  # e.g. a file of density entries only, or eigs of other settings: the curve alone
    return results_query.lambda_extremes(eigs)
