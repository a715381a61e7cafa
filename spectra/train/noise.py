"""Noise-based saddle-escaping baselines: perturbed gradient descent and LPF-SGD.

PGD (Jin et al. 2017): after the update, if ``‖g‖ ≤ threshold`` and at least
``interval`` steps passed since the last perturbation, add ``ξ = r · z/‖z‖``,
``z ~ N(0, I)`` (uniform on the sphere of radius r; in 4.6·10⁵ dimensions the
uniform ball has all its mass within 10⁻⁵·r of that sphere).

LPF-SGD (Bisla et al. 2022), as its authors' code: the batch is split into
``M`` equal parts and part m's gradient is taken at ``w + ε_m`` (weight 1/M;
one update per batch, so a step costs one plain forward-backward pass). The
noise follows each filter's scale: for a weight of two or more dimensions, row
``i`` (output channel / unit) gets ``ε ~ N(0, (σ ‖W_i‖)²)``; a bias or
BatchNorm vector gets ``N(0, (σ (‖W‖ + 1e-16))²)``. It is a Monte-Carlo
estimate of the gradient of the loss convolved with that Gaussian.

Random numbers are drawn by the caller into flat buffers (one call per step,
from a seeded generator) so that runs are reproducible and graph-capturable.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["split_like", "pgd_perturbation", "LPFNoise"]


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


class LPFNoise:
    """LPF-SGD noise for a fixed list of parameter tensors, from a flat standard-normal ``z``:
    ``σ · ‖W_i‖ · z`` on row ``i`` of a weight with two or more dimensions, ``σ · (‖W‖ + 1e-16) · z``
    on a vector.

    Every element knows its row (``row_of``, built once) and rows are contiguous in the flattened
    parameters, so the norms of all rows of all tensors come from one float64 running sum (a
    handful of kernels per draw instead of a few per tensor — ResNet-32 has 95 — in a GPU step of
    small kernels; a scan, unlike an atomic ``index_add_``, is deterministic on CUDA).
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        rows, ids, tiny, lengths = 0, [], [], []
        for p in params:
            n = p.shape[0] if p.dim() > 1 else 1
            ids.append(torch.arange(rows, rows + n, device=p.device).repeat_interleave(p.numel() // n))
            tiny.append(torch.full((n,), 0.0 if p.dim() > 1 else 1e-16, dtype=torch.float64, device=p.device))
            lengths += [p.numel() // n] * n
            rows += n
        self.row_of, self.tiny = torch.cat(ids), torch.cat(tiny)
        self.row_end = torch.tensor(lengths, device=params[0].device).cumsum(0) - 1  # each row's last element
        self.zero = torch.zeros(1, dtype=torch.float64, device=params[0].device)

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, params: Sequence[torch.Tensor], sigma: float) -> list[torch.Tensor]:
        """The noise, shaped like ``params`` (views of one flat tensor)."""
        flat = torch.cat([p.reshape(-1) for p in params]).double()
        running = torch.cat([self.zero, torch.cumsum(flat * flat, 0)[self.row_end]])
        scale = ((running[1:] - running[:-1]).sqrt_() + self.tiny).mul_(sigma).to(z.dtype)
        return split_like(z * scale[self.row_of], params)
