"""Test-set evaluation: overall, per-class, many/medium/few-shot and tail accuracy.

Accuracies are top-1 in percent. Class groups follow the reference code's
split on the *training* class counts: many-shot ``n_c > 100``, few-shot
``n_c < 20``, medium otherwise (on CIFAR-10-LT no class is few-shot).
"Tail" is the rarest ``ceil(tail_fraction · C)`` classes (default 30 %):
on CIFAR-10-LT the 3 rarest (139, 83, 50 images), on CIFAR-100-LT the 30
rarest, which are exactly its few-shot classes. Overall accuracy is over all
test images (the test sets are balanced, so it is also the class mean).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from ..datasets import normalize

__all__ = ["tail_classes", "class_groups", "evaluate", "summarize_predictions"]

MANY_SHOT_MIN = 100  # many-shot: more than 100 training images
FEW_SHOT_MAX = 20  # few-shot: fewer than 20


def tail_classes(class_counts: Sequence[int], fraction: float = 0.3) -> list[int]:
    """Indices of the ``ceil(fraction · C)`` rarest classes (ties: higher index first)."""
    k = max(1, math.ceil(fraction * len(class_counts) - 1e-9))
    order = sorted(range(len(class_counts)), key=lambda c: (class_counts[c], -c))
    return sorted(order[:k])


def class_groups(class_counts: Sequence[int]) -> dict[str, list[int]]:
    """``{"many": [...], "medium": [...], "few": [...]}`` by training counts."""
    groups: dict[str, list[int]] = {"many": [], "medium": [], "few": []}
    for c, n in enumerate(class_counts):
        key = "many" if n > MANY_SHOT_MIN else "few" if n < FEW_SHOT_MAX else "medium"
        groups[key].append(c)
    return groups


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def summarize_predictions(correct_per_class: torch.Tensor, total_per_class: torch.Tensor, class_counts: Sequence[int], tail_fraction: float = 0.3) -> dict[str, Any]:
    """Accuracy summary from per-class hit and sample counts."""
    total = total_per_class.clamp(min=1).double()
    per_class = (100.0 * correct_per_class.double() / total).tolist()
    present = [c for c in range(len(per_class)) if int(total_per_class[c]) > 0]
    groups = class_groups(class_counts)
    tail = tail_classes(class_counts, tail_fraction)
    out: dict[str, Any] = {
        "acc": float(100.0 * correct_per_class.sum() / total_per_class.sum().clamp(min=1)),
        "per_class_acc": per_class,
        "tail_acc": _mean([per_class[c] for c in tail if c in present]),
        "tail_classes": tail,
    }
    for name, members in groups.items():
        out[f"{name}_acc"] = _mean([per_class[c] for c in members if c in present])
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    class_counts: Sequence[int],
    batch_size: int = 1000,
    tail_fraction: float = 0.3,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` (eval mode, restored afterwards) on uint8 NHWC ``images``
    already on the model's device."""
    was_training = model.training
    model.eval()
    num_classes = len(class_counts)
    correct = torch.zeros(num_classes, dtype=torch.long, device=labels.device)
    seen = torch.zeros(num_classes, dtype=torch.long, device=labels.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=labels.device)
    for start in range(0, labels.shape[0], batch_size):
        x = normalize(images[start : start + batch_size])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = labels[start : start + batch_size]
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            logits = model(x).float()
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").double()
        hits = logits.argmax(1) == y
        correct += torch.bincount(y[hits], minlength=num_classes)
        seen += torch.bincount(y, minlength=num_classes)
    model.train(was_training)
    out = summarize_predictions(correct.cpu(), seen.cpu(), class_counts, tail_fraction)
    out["loss"] = float(loss_sum / max(int(labels.shape[0]), 1))
    return out
