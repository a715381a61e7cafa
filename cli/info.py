"""``spectra info RESULTS.h5``: a readable table of what a results file holds."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from spectra import results_query, store

from .common import emit_json, fmt, format_table, handle_errors, record_to_json

__all__ = ["info"]


def _summary(record: store.ResultRecord) -> tuple[str, str]:
    """(result, quality) columns for one entry."""
    a, p = record.arrays, record.provenance
    if record.kind == "eigs":
        top = fmt(float(a["top"][0])) if len(a["top"]) else "-"
        bottom = fmt(float(a["bottom"][0])) if len(a["bottom"]) else "-"
        residuals = [float(x) for x in list(a["top_residuals"]) + list(a["bottom_residuals"])]
        worst = fmt(max(residuals), 2) if residuals else "-"
        quality = f"res {worst}" + ("" if p.get("converged", True) else " NOT converged")
        return f"λmax {top:>9}  λmin {bottom:>9}", quality
    if record.kind == "density":
        low, high = fmt(float(a["nodes"].min())), fmt(float(a["nodes"].max()))
        return f"nodes [{low:>9}, {high:>9}]", f"sigma {fmt(p.get('sigma'), 2)}"
    return f"trace {fmt(float(a['estimate'])):>9}", f"± {fmt(float(a['stderr']), 2)}"


@click.command("info")
@click.argument("results", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print every entry as JSON (only that) on stdout.")
@handle_errors
def info(results: str, as_json: bool) -> None:
    """List the entries of a results file: run, epoch, class, analysis, result, settings."""
    records = store.read_results(results)
    if as_json:
        emit_json([record_to_json(r) for r in records])
        return
    attrs = store.file_attributes(results)
    version, created = attrs.get("schema_version"), attrs.get("created_utc", "")
    # Runs by their file-wide label: two checkpoint folders with one name show as seedA/ce-drw, seedB/ce-drw.
    run_label = {run.key: run.label for run in results_query.list_runs(results)}
    runs = sorted({run_label[r.run_key] for r in records})
    click.echo(f"{results}: spectra results schema v{version}, created {created}, "
               f"{Path(results).stat().st_size / 1e6:.2f} MB, {len(records)} entries, runs: {', '.join(runs) or '-'}")
    rows: list[list[Any]] = []
    for r in records:
        p = r.provenance
        result, quality = _summary(r)
        rows.append([run_label[r.run_key], r.epoch, f"{r.class_index} {p.get('class_name', '')}", r.kind, p.get("num_samples"),
                     fmt(float(p.get("loss", float("nan")))), result, quality, p.get("dtype"),
                     str(p.get("settings_hash", ""))[:8],
                     "copy" if p.get("alias_of") else f"{float(p.get('wall_time_s', 0.0)):.1f}s"])
    if rows:
        click.echo(format_table(["run", "epoch", "class", "kind", "n", "loss", "result", "quality", "dtype",
                                 "settings", "time"], rows))
