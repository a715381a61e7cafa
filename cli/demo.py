"""``spectra demo``: the whole story — train, analyse per class, plot — on a CPU
in minutes, on the CIFAR-10 sample shipped in ``data/`` (no download).
"""
from __future__ import annotations

import click

__all__ = ["demo"]


@click.command("demo", context_settings={"show_default": True})
@click.option("--out", "out_dir", default="spectra-demo", type=click.Path(file_okay=False),
              help="Folder for data/, runs/, results.h5, ratio.png and density.png (a rerun reuses what is there).")
@click.option("--quick", is_flag=True, help="Reduced setting (3 epochs, 200 images, 3 classes): about half a minute.")
@click.option("--epochs", type=int, default=None, help="Training epochs, at least 2 [default: 12; --quick: 3].")
@click.option("--samples-per-class", type=click.IntRange(min=1), default=None,
              help="Samples of each class in its Hessian [default: 24; --quick: 8].")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch threads [default: 1; more helps only on idle cores].")
@click.option("--progress/--no-progress", default=True, help="Progress bars on stderr.")
def demo(out_dir: str, quick: bool, epochs: int | None, samples_per_class: int | None, threads: int | None,
         progress: bool) -> None:
    """Train a small long-tailed CIFAR-10 model with CE+DRW and CE+DRW+SAM, compute per-class
    Hessian λmax/λmin of its checkpoints into OUT/results.h5, and plot OUT/ratio.png and
    OUT/density.png.

    Example: spectra demo --out demo && open demo/ratio.png
    """
    from spectra import distributed as sd
    from spectra.demo import MIN_EPOCHS, DemoConfig, DemoError, run_demo
    from spectra.store import StoreError

    if sd.launched_by_torchrun():  # its steps print and write as one process: every rank would repeat them
        raise click.ClickException("spectra demo runs in one process; start it without torchrun")

    config = DemoConfig.quick() if quick else DemoConfig()
    changes: dict = {}
    if epochs is not None:
        if epochs < MIN_EPOCHS:
            raise click.ClickException(f"the demo needs --epochs >= {MIN_EPOCHS}: DRW switches on half-way, after "
                                       f"drw_epoch = epochs // 2 >= 1 epochs, before the last one; got --epochs {epochs}")
        # Keep the schedule's shape: DRW from half-way, lr decay at three quarters,
        # every other epoch analysed (always the last).
        changes.update(epochs=epochs, drw_epoch=max(1, epochs // 2), lr_decay_epoch=max(1, (3 * epochs) // 4),
                       sweep_epochs=tuple(sorted(range(epochs, 0, -2))))
    if samples_per_class is not None:
        changes["samples_per_class"] = samples_per_class
    if threads is not None:
        changes["threads"] = threads
    try:
        if changes:
            config = config.replace(**changes)
        result = run_demo(out_dir, config, progress=progress,
                          log=lambda msg: click.echo(msg, err=True))
    except (DemoError, StoreError, ValueError, FileNotFoundError, OSError, RuntimeError) as exc:
        text = str(exc).strip().splitlines()
        raise click.ClickException(text[0] if text else type(exc).__name__) from None
    click.echo(f"wrote {result.results}, {result.ratio_png}, {result.density_png} "
               f"(runs in {result.out / 'runs'}; {result.timings['total']:.0f} s)")
