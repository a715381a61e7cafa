"""``spectra plot ratio | density``: figures of a results file, written as images."""
from __future__ import annotations

from typing import Any

import click

from spectra import store
from spectra.class_data import resolve_classes
from spectra.plots import plot_density, plot_ratio

from .common import handle_errors

__all__ = ["plot"]


@click.group("plot")
def plot() -> None:
    """Figures of a results file (PNG, PDF or SVG by the output's suffix)."""


@plot.command("ratio")
@click.argument("results", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False), help="Image to write.")
@click.option("--run", "runs", multiple=True, help="Runs (checkpoint folders) to show, one panel each; default all.")
@click.option("--log/--linear", "log_scale", default=None, help="Y axis scale (default: log when ratios span >2 decades).")
@click.option("--title", default=None)
@handle_errors
def ratio(results: str, output: str, runs: tuple[str, ...], log_scale: bool | None, title: str | None) -> None:
    """|λmin/λmax| per class over epochs: one line per class, head (blue) to tail (red)."""
    chosen = list(runs) or store.runs(results)
    if not chosen:
        raise click.ClickException(f"{results} holds no eigenvalue entries")
    tables = {run: store.eigen_table(results, run=run) for run in chosen}
    plot_ratio(tables, store.class_names(results), store.class_sizes(results), out=output,
               log_scale=log_scale, title=title)
    click.echo(f"wrote {output}")


@plot.command("density")
@click.argument("results", type=click.Path(dir_okay=False))
@click.option("--class", "class_spec", required=True, help="Class index or name.")
@click.option("--epoch", "epochs", type=int, multiple=True, required=True,
              help="Epoch of the checkpoint (repeat to overlay several).")
@click.option("--run", default=None, help="Run (checkpoint folder) when the file holds several.")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False), help="Image to write.")
@handle_errors
def density(results: str, class_spec: str, epochs: tuple[int, ...], run: str | None, output: str) -> None:
    """Spectral density of one class at one or more epochs (log scale), with λmin/λmax when stored."""
    names = store.class_names(results)
    ordered = [names.get(i, str(i)) for i in range(max(names) + 1)] if names else []
    (class_index,) = resolve_classes(class_spec, ordered)
    records = [store.density_record(results, class_index, e, run=run) for e in epochs]
    extremes = _extremes(results, class_index, epochs[0], records[0].run) if len(epochs) == 1 else None
    plot_density(records, out=output, extremes=extremes)
    click.echo(f"wrote {output}")


def _extremes(results: str, class_index: int, epoch: int, run: str) -> tuple[float, float] | None:
    """(λmin, λmax) of the same class, epoch and run from an eigs entry, if any."""
    table: dict[int, Any] = store.eigen_table(results, run=run) if run in store.runs(results) else {}
    series = table.get(class_index)
    if series is None or epoch not in series.epochs.tolist():
        return None
    i = series.epochs.tolist().index(epoch)
    return float(series.lambda_min[i]), float(series.lambda_max[i])
