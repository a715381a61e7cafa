"""Stochastic trace estimation: Hutchinson and Hutch++.

Hutchinson: tr(H) ≈ (1/P) Σ_p v_p^T H v_p with Rademacher v_p (E[v vᵀ] = I).
Hutch++ (Meyer, Musco, Musco, Woodruff 2021): with a budget of m products,
sketch Q = orth(H S) from m/3 random vectors S, take tr(QᵀHQ) exactly, and
apply Hutchinson to the deflated remainder (I−QQᵀ)H(I−QQᵀ) with the other
m/3 vectors — far lower variance when the spectrum has a few large
eigenvalues, as Hessians do. Standard errors are the sample standard
deviation of the stochastic part over √(probes).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from .lanczos import orthogonalize, random_probes
from .progress import progress_bar

METHODS = ("hutchinson", "hutch++")
# Fewest products that give a finite standard error: two samples of the
# stochastic part (Hutch++: after one sketch product and one to map it).
MIN_PROBES = {"hutchinson": 2, "hutch++": 4}
# Columns per call to H: a fixed size (not one that depends on ``progress``),
# so every torchrun rank makes the same calls and the progress bar moves.
_PRODUCT_BLOCK = 10


@dataclass
class TraceResult:
    """tr(H) estimate and its standard error (of the stochastic part)."""

    estimate: float
    stderr: float
    method: str
    num_probes: int
    num_matvecs: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _products(H: Any, v: Tensor, bar: Any) -> Tensor:
    """H v in float64 on v's device, in blocks of ``_PRODUCT_BLOCK`` columns (one bar step each)."""
    out = torch.empty_like(v, dtype=torch.float64)
    for start in range(0, v.shape[1], _PRODUCT_BLOCK):
        cols = v[:, start:start + _PRODUCT_BLOCK]
        out[:, start:start + cols.shape[1]] = H.matmul(cols).to(v.device, torch.float64)
        bar.update(cols.shape[1])
    return out


def _quadratic_forms(H: Any, v: Tensor, bar: Any) -> np.ndarray:
    """v_pᵀ H v_p for every column p of v."""
    return (v * _products(H, v, bar)).sum(dim=0).cpu().numpy()


def _stderr(samples: np.ndarray) -> float:
    return float(samples.std(ddof=1) / np.sqrt(len(samples))) if len(samples) > 1 else float("nan")


def trace(H: Any, num_probes: int = 30, method: str = "hutch++", seed: int = 0,
          device: Optional[torch.device] = None, progress: bool = False) -> TraceResult:
    """Estimate tr(H) with ``num_probes`` Hessian-vector products in total.

    ``method="hutchinson"``: all products are Rademacher probes.
    ``method="hutch++"``: a third sketches the dominant subspace (whose trace
    is taken exactly), a third maps it, the rest probes the remainder; needs
    ``num_probes >= 4`` (:data:`MIN_PROBES`). Probes are drawn with ``seed``;
    products go to H in blocks. ``progress``: a bar of the products on stderr.
    """
    if method not in METHODS:
        raise ValueError(f"unknown trace method {method!r}; choose from {METHODS}")
    if num_probes < MIN_PROBES[method]:
        raise ValueError(f"{method} needs at least {MIN_PROBES[method]} probes for a standard error")
    with progress_bar(total=num_probes, desc="trace", unit="hvp", enabled=progress) as bar:
        return _estimate(H, num_probes, method, seed, device or getattr(H, "device", None), bar)


def _estimate(H: Any, num_probes: int, method: str, seed: int, device: Optional[torch.device],
              bar: Any) -> TraceResult:
    """The estimate of :func:`trace` (arguments checked), advancing ``bar`` per product."""
    dim = int(H.dim)
    if method == "hutchinson":
        samples = _quadratic_forms(H, random_probes(dim, num_probes, seed, "rademacher", device), bar)
        return TraceResult(float(samples.mean()), _stderr(samples), method, num_probes, num_probes)
    sketch = min(num_probes // 3, dim)
    remaining = num_probes - 2 * sketch
    s = random_probes(dim, sketch, seed, "rademacher", device)
    q, _ = torch.linalg.qr(_products(H, s, bar))
    exact = float(_quadratic_forms(H, q, bar).sum())
    if remaining < 1:
        return TraceResult(exact, 0.0, method, num_probes, 2 * sketch)
    g = random_probes(dim, remaining, seed + 1, "rademacher", device)
    orthogonalize(g, q)  # g ← (I − QQᵀ) g
    samples = _quadratic_forms(H, g, bar)
    return TraceResult(exact + float(samples.mean()), _stderr(samples), method, num_probes,
                       2 * sketch + remaining)
