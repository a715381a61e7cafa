"""``spectra train``: train ResNet-32 on (long-tailed) CIFAR with a method preset.

Writes self-describing checkpoints (``ckpt_epochNNNN.pt``, ``last.pt``) that
``spectra eigs/density/sweep`` load without extra flags, ``metrics.jsonl``
(one line per evaluation), ``summary.json`` and ``config.json``.

Under ``torchrun`` it trains data-parallel: ``--batch-size`` is the global
batch, split evenly over the ranks; rank 0 alone writes and prints.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from spectra import distributed as sd
from spectra.datasets import DATASET_NAMES, download_cifar
from spectra.train.config import METHOD_DESCRIPTIONS, METHODS, parse_override, resolve_config, settings_without_effect

from .common import quiet_rank


def _methods_help() -> str:
    return "; ".join(f"{name}: {desc}" for name, desc in METHOD_DESCRIPTIONS.items())


@click.command("train", context_settings={"show_default": True})
@click.option("--method", required=True, type=click.Choice(list(METHODS)), help="Method preset (reference defaults). " + _methods_help())
@click.option("--dataset", default="cifar10-lt", type=click.Choice(list(DATASET_NAMES)), help="Data set; -lt: long-tailed train split, balanced test split.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Folder containing cifar-10-batches-py / cifar-100-python (default: $SPECTRA_DATA_ROOT or ~/.cache/spectra/data).")
@click.option("--download", is_flag=True, help="Fetch the official CIFAR archive into --data-root first (needs internet).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Run folder (checkpoints, metrics.jsonl, summary.json).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs [default: 200]. LR decays and DRW scale with it unless set with --set.")
@click.option("--save-every", type=click.IntRange(min=1), default=None, help="Keep a checkpoint every N epochs (also epoch 1 and the last) [default: 10].")
@click.option("--eval-every", type=click.IntRange(min=1), default=None, help="Evaluate on the test set every N epochs [default: 1].")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Seed of model init, shuffling and augmentation [default: 0].")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 or auto [default: auto].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="[default: 128]")
@click.option("--lr", type=float, default=None, help="Base learning rate [default: 0.1].")
@click.option("--weight-decay", type=float, default=None, help="[default: 2e-4]")
@click.option("--rho", type=float, default=None, help="SAM radius (preset default per data set).")
@click.option("--imbalance-ratio", type=float, default=None, help="n_max / n_min of the -lt train split [default: 100].")
@click.option("--imbalance-profile", type=click.Choice(["exp", "step"]), default=None, help="[default: exp]")
@click.option("--compile", "compile_mode", type=click.Choice(["auto", "off", "graphs", "inductor", "max"]), default=None,
              help="Speed-up: graphs = CUDA-graph capture of the whole step, inductor = torch.compile, max = both; auto = graphs on CUDA, off on CPU.")
@click.option("--amp", type=click.Choice(["off", "bf16"]), default=None, help="bf16 autocast [default: off]; on CPUs with AVX512-BF16 it trained ResNet-32 1.6x faster (rounding changes the run, docs/training.md#speed).")
@click.option("--channels-last/--no-channels-last", default=None,
              help="channels_last (NHWC) memory format [default: on for CPUs, where it trains ResNet-32 1.3x faster; off on CUDA].")
@click.option("--spectra-every", type=click.IntRange(min=0), default=None, help="Per-class Hessian λmax/λmin every N epochs into results.h5 (the schema of spectra sweep) and spectra.jsonl (0: off).")
@click.option("--sync-bn", is_flag=True, default=None, help="Under torchrun on GPUs: SyncBatchNorm (statistics of the global batch instead of each rank's rows).")
@click.option("--max-train-samples", type=click.IntRange(min=1), default=None, help="Train on about N images (every class kept): quick checks.")
@click.option("--max-test-samples", type=click.IntRange(min=1), default=None, help="Evaluate on about N test images.")
@click.option("--time-limit-s", type=float, default=None, help="Stop cleanly after the epoch that passes this many seconds (> 0).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override any setting of spectra.train.TrainConfig, e.g. --set vs_gamma=0.2 --set lr_milestones=[100,150]. "
                   "A setting that has its own option (--lr, --epochs, ...) is given once: with both, it is an error.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt.")
@click.option("--progress/--no-progress", default=True, help="Progress bar (loss, accuracy, images/s).")
def train(method: str, dataset: str, data_root: str | None, download: bool, out_dir: str, overrides: tuple[str, ...], resume: bool, progress: bool, **options: Any) -> None:
    """Train a model with a method preset of the paper's table and write checkpoints spectra can analyse.

    Example: spectra train --method ce-drw-sam --dataset cifar10-lt --data-root DIR --out runs/ce-drw-sam
    """
    from spectra.store import StoreError
    from spectra.train import fit
    from spectra.train.run_folder import check_out_dir_is_free

    options.update(data_root=str(Path(data_root).expanduser()) if data_root is not None else None, progress=progress)
    out = Path(out_dir)
    try:
        settings, explicit = _settings(click.get_current_context(), options, overrides)
        config = resolve_config(method, dataset, new_run=not resume, **settings)
        _refuse_settings_without_effect(config, explicit)
        if not resume:  # before a download; fit checks it again (the library's own guard)
            check_out_dir_is_free(out)
    except ValueError as exc:  # under torchrun rank 0 alone prints it (the command group's main)
        raise click.ClickException(str(exc)) from None
    try:
        if download and not quiet_rank():  # the others wait for it in the group's rendezvous
            download_cifar(dataset, config.data_root)
        with sd.distributed_session(device=None if config.device == "auto" else config.device) as ctx:
            result = fit(config, out, resume=resume, log=lambda msg: click.echo(msg, err=True))
    # ValueError covers bad settings and unreadable data or checkpoint files (the message names the file);
    # OSError: an --out under a regular file, no permission, a full disk.
    except (ValueError, OSError, RuntimeError, StoreError) as exc:
        raise click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    if not ctx.is_writer:
        return
    click.echo(_result_line(method, dataset, result.summary, out, result.already_complete))


# Settings that have an option of their own (option parameter name -> setting).
_OPTION_SETTINGS = {"compile_mode": "compile"}


def _refuse_settings_without_effect(config: Any, explicit: dict[str, str]) -> None:
    """A setting the user gave that the method never uses (``--rho`` with ce) is an error:
    the run's config would record it as if it had been used."""
    unused = settings_without_effect(config, explicit)
    if unused:
        given = "; ".join(f"{explicit[k]} needs {need}" for k, need in unused.items())
        them = "it" if len(unused) == 1 else "them"
        raise ValueError(f"{given}; {config.method} does not use {them} (set the optimizer, loss or drw too, "
                         f"or leave {them} out)")


def _settings(ctx: click.Context, options: dict[str, Any], overrides: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, str]]:
    """The options the user gave plus the ``--set`` overrides, as TrainConfig
    settings, and how the user gave each explicit one. A setting given both ways
    is an error, whatever the order."""
    explicit: dict[str, str] = {}  # setting -> how the user gave it
    settings: dict[str, Any] = {}
    for name, value in options.items():
        key = _OPTION_SETTINGS.get(name, name)
        source = ctx.get_parameter_source(name)
        if value is not None:
            settings[key] = value
        if source not in (None, click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP):
            param = next(p for p in ctx.command.params if p.name == name)
            if isinstance(value, bool):  # a flag: --progress / --no-progress
                explicit[key] = param.opts[0] if value or not param.secondary_opts else param.secondary_opts[0]
            else:
                explicit[key] = f"{param.opts[0]} {value}"
    for text in overrides:
        key, value = parse_override(text)
        if key in explicit:
            raise ValueError(f"--set {text} conflicts with {explicit[key]}: give {key} once")
        explicit[key] = f"--set {text}"
        settings[key] = value
    return settings, explicit


def _result_line(method: str, dataset: str, s: dict[str, Any], out: Path, already_complete: bool) -> str:
    """The one-line report of a finished (or already complete) run."""
    final, best = s.get("final") or {}, s.get("best") or {}
    tail = ",".join(str(c) for c in s.get("tail_classes", []))
    pct = lambda v: "n/a" if v is None else f"{v:.2f}%"  # noqa: E731
    head = (f"{method} on {dataset}: run already complete (epoch {s['epochs_completed']}/{s['epochs_planned']}), nothing to train"
            if already_complete else f"{method} on {dataset}: epoch {s['epochs_completed']}/{s['epochs_planned']}")
    speed = f"; {s['seconds_per_epoch']:.2f} s/epoch" if s.get("seconds_per_epoch") else ""
    return (f"{head}, test acc {pct(final.get('acc'))}, tail acc {pct(final.get('tail_acc'))} (classes {tail}); "
            f"best {pct(best.get('acc'))} at epoch {best.get('epoch')}{speed}; run in {os.fspath(out)}")
