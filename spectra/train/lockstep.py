"""Several training runs in one process, step by step in lockstep, each on its own
CUDA stream, so that their small kernels (or replayed CUDA graphs) overlap on
one GPU (``benchmarks/reproduce_cifar10lt.py --mode streams``)."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

import torch

from .config import TrainConfig
from .trainer import FitResult, Trainer

__all__ = ["run_in_lockstep", "fit_many"]


def run_in_lockstep(runners: list[Any], device: torch.device) -> list[Any]:
    """Drive ``runners`` (objects with Trainer's epoch protocol: ``begin``,
    ``done``, ``epoch``, ``start_train_epoch``, ``train_step``,
    ``finish_train_epoch``, ``end_epoch``, ``finish``) step by step in
    lockstep, each on its own CUDA stream on ``device`` (alternating on the
    CPU); returns their ``finish()`` results."""
    streams = [torch.cuda.Stream(device=device) if device.type == "cuda" else None for _ in runners]

    def on(stream: Any) -> Any:
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    for r, st in zip(runners, streams):
        with on(st):
            r.begin()
    while True:
        active = [(r, st) for r, st in zip(runners, streams) if not r.done]
        if not active:
            break
        steps = {}
        for r, st in active:
            with on(st):
                steps[id(r)] = r.start_train_epoch(r.epoch)
        for i in range(max(steps.values())):
            for r, st in active:
                if i < steps[id(r)]:
                    with on(st):
                        r.train_step(i)
        for r, st in active:
            with on(st):
                r.end_epoch(r.finish_train_epoch())
    results = []
    for r, st in zip(runners, streams):
        with on(st):
            results.append(r.finish())
    return results


def fit_many(
    configs: list[TrainConfig], out_dirs: list[str | Path], resume: bool = False, log: Callable[[str], None] | None = None
) -> list[FitResult]:
    """Train several runs in one process, step by step in lockstep, each on its
    own CUDA stream, so that their small kernels (or replayed graphs) overlap on
    one GPU. Each run is exactly what :func:`fit` would produce; on the CPU
    they simply alternate. Runs must use the same device.
    """
    trainers = [Trainer(c, d, resume=resume, log=log) for c, d in zip(configs, out_dirs)]
    devices = {t.device for t in trainers}
    if len(devices) != 1:
        raise ValueError(f"fit_many needs one device; got {sorted(map(str, devices))}")
    return run_in_lockstep(trainers, next(iter(devices)))
