"""Noise-based saddle-escaping baselines: perturbed gradient descent and LPF-SGD.

PGD (Jin et al. 2017): after the update, if ``‖g‖ ≤ threshold`` and at least
``interval`` steps passed since the last perturbation, add ``ξ = r · z/‖z‖``,
``z ~ N(0, I)`` (uniform on the sphere of radius r; in 4.6·10⁵ dimensions the
uniform ball has all its mass within 10⁻⁵·r of that sphere).

LPF-SGD (Bisla et al. 2022): the gradient is the average of the gradients at
``M`` Gaussian-perturbed copies ``w + ε_m``, ``ε_m ~ N(0, (σ ‖W‖_F)²)`` for
each parameter tensor ``W`` (noise scaled by the tensor's norm), which is a
Monte-Carlo estimate of the gradient of the loss convolved with that Gaussian.

Random numbers are drawn by the caller into flat buffers (one call per step,
from a seeded generator) so that runs are reproducible and graph-capturable.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["split_like", "pgd_perturbation", "lpf_noise"]


def split_like(flat: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like ``params`` (in order)."""
    out, start = [], 0
    for p in params:
        n = p.numel()
        out.append(flat[start : start + n].view_as(p))
        start += n
    return out


@torch.no_grad()
def pgd_perturbation(z: torch.Tensor, radius: float, eligible: torch.Tensor) -> torch.Tensor:
    """``eligible · r · z / ‖z‖`` for a flat standard-normal ``z`` (``eligible``: 0-dim 0/1)."""
    return z * (eligible * radius / torch.linalg.vector_norm(z))


@torch.no_grad()
def lpf_noise(z: torch.Tensor, params: Sequence[torch.Tensor], sigma: float) -> list[torch.Tensor]:
    """Per-tensor noise ``σ · ‖W‖_F · z_W`` from a flat standard-normal ``z``."""
    norms = torch._foreach_norm(list(params))
    parts = split_like(z, params)
    return torch._foreach_mul(parts, torch._foreach_mul(norms, sigma))  # multi-tensor kernels, not one per tensor
