"""Long-tail losses: cross-entropy, LDAM, VS, and effective-number class weights.

All losses take a per-class weight vector ``weight`` (a buffer, changed in
place when deferred re-weighting switches on) and reduce like
``F.cross_entropy(..., weight=w)``: ``Σ_i w_{y_i} ℓ_i / Σ_i w_{y_i}``. With
all-ones weights this is the plain mean.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "effective_number_weights",
    "ldam_margins",
    "vs_scales_and_offsets",
    "WeightedCrossEntropy",
    "LDAMLoss",
    "VSLoss",
    "build_loss",
]


def _counts(class_counts: Sequence[int]) -> np.ndarray:
    # A class absent from a (tiny) training subset counts as one image so that
    # margins, weights and priors stay finite.
    return np.maximum(np.asarray(class_counts, dtype=np.float64), 1.0)


def effective_number_weights(class_counts: Sequence[int], beta: float = 0.9999) -> torch.Tensor:
    """Class-balanced weights of Cui et al. (2019):
    ``w_c = (1 − β) / (1 − β^{n_c})``, normalised so that ``Σ_c w_c = C``.

    ``β = 0`` gives all-ones weights (DRW before its switch epoch).
    """
    counts = _counts(class_counts)
    if beta == 0:
        return torch.ones(len(counts), dtype=torch.float32)
    w = (1.0 - beta) / (1.0 - np.power(beta, counts))
    w = w / w.sum() * len(counts)
    return torch.tensor(w, dtype=torch.float32)


def ldam_margins(class_counts: Sequence[int], max_margin: float = 0.5) -> torch.Tensor:
    """LDAM margins (Cao et al. 2019): ``m_c ∝ n_c^{−1/4}``, scaled so ``max_c m_c = max_margin``."""
    m = 1.0 / np.sqrt(np.sqrt(_counts(class_counts)))
    m = m * (max_margin / m.max())
    return torch.tensor(m, dtype=torch.float32)


def vs_scales_and_offsets(class_counts: Sequence[int], gamma: float, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Vector-scaling parameters (Kini et al. 2021): logits become ``Δ_c z_c + ι_c``
    with ``Δ_c = (n_c / n_max)^γ`` and ``ι_c = τ · log π_c``, ``π_c = n_c / Σ n``."""
    counts = _counts(class_counts)
    scale = (counts / counts.max()) ** gamma
    offset = tau * np.log(counts / counts.sum())
    return torch.tensor(scale, dtype=torch.float32), torch.tensor(offset, dtype=torch.float32)


class WeightedCrossEntropy(nn.Module):
    """``CE(z, y)`` with per-class weights (the buffer ``weight``, ones by default)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(num_classes))

    def adjust_logits(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return logits

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # half-precision logits are lifted to float32; float64 (Hessian analyses) stays float64
        z = self.adjust_logits(logits.to(torch.promote_types(logits.dtype, torch.float32)), target)
        return F.cross_entropy(z, target, weight=self.weight.to(z.dtype))


class LDAMLoss(WeightedCrossEntropy):
    """``CE(s · (z − m_y e_y), y)``: subtract the class margin from the true logit, then scale."""

    def __init__(self, class_counts: Sequence[int], max_margin: float = 0.5, scale: float = 30.0) -> None:
        super().__init__(len(class_counts))
        self.register_buffer("margins", ldam_margins(class_counts, max_margin))
        self.scale = float(scale)

    def adjust_logits(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
        return self.scale * (logits - onehot * self.margins[target].unsqueeze(1))


class VSLoss(WeightedCrossEntropy):
    """``CE(Δ ⊙ z + ι, y)`` with the vector-scaling ``Δ`` and ``ι`` of :func:`vs_scales_and_offsets`."""

    def __init__(self, class_counts: Sequence[int], gamma: float = 0.3, tau: float = 1.0) -> None:
        super().__init__(len(class_counts))
        scale, offset = vs_scales_and_offsets(class_counts, gamma, tau)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)

    def adjust_logits(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return logits * self.scale + self.offset


def build_loss(name: str, class_counts: Sequence[int], **params: float) -> WeightedCrossEntropy:
    """``ce`` | ``ldam`` (max_margin, scale) | ``vs`` (gamma, tau)."""
    if name == "ce":
        return WeightedCrossEntropy(len(class_counts))
    if name == "ldam":
        return LDAMLoss(class_counts, max_margin=params.get("max_margin", 0.5), scale=params.get("scale", 30.0))
    if name == "vs":
        return VSLoss(class_counts, gamma=params.get("gamma", 0.3), tau=params.get("tau", 1.0))
    raise ValueError(f"unknown loss {name!r}; expected ce, ldam or vs")
