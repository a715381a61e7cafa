"""Per-epoch schedules of the CIFAR long-tail recipe: learning rate and DRW.

Epochs are 1-indexed here (epoch 1 is the first epoch), as in the reference
``adjust_learning_rate``, which adds one to its 0-indexed loop counter.
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["learning_rate", "drw_active"]


def learning_rate(
    epoch: int,
    base_lr: float,
    warmup_epochs: int = 5,
    milestones: Sequence[int] = (160, 180),
    factors: Sequence[float] = (0.01, 0.0001),
) -> float:
    """Learning rate of 1-indexed ``epoch``.

    ``epoch ≤ warmup``: ``base · epoch / warmup`` (linear warm-up); afterwards
    ``base · factors[i]`` for the last milestone ``i`` with ``epoch > milestones[i]``,
    else ``base``. Reference: 0.1 · e/5 for e ≤ 5, 0.1, then 1e-3 after 160, 1e-5 after 180.
    """
    if epoch <= warmup_epochs:
        return base_lr * epoch / warmup_epochs
    lr = base_lr
    for milestone, factor in zip(milestones, factors):
        if epoch > milestone:
            lr = base_lr * factor
    return lr


def drw_active(epoch: int, drw_epoch: int) -> bool:
    """Deferred re-weighting is on for 1-indexed ``epoch`` iff ``epoch − 1 ≥ drw_epoch``
    (reference: ``idx = epoch // 160`` on the 0-indexed epoch)."""
    return epoch - 1 >= drw_epoch
