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

METHODS = ("hutchinson", "hutch++")


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


def _quadratic_forms(H: Any, v: Tensor) -> np.ndarray:
    """v_pᵀ H v_p for every column p of v."""
    return (v * H.matmul(v).to(v.device, torch.float64)).sum(dim=0).cpu().numpy()


def _stderr(samples: np.ndarray) -> float:
    return float(samples.std(ddof=1) / np.sqrt(len(samples))) if len(samples) > 1 else float("nan")


def trace(H: Any, num_probes: int = 30, method: str = "hutch++", seed: int = 0,
          device: Optional[torch.device] = None) -> TraceResult:
    """Estimate tr(H) with ``num_probes`` Hessian-vector products in total.

    ``method="hutchinson"``: all products are Rademacher probes.
    ``method="hutch++"``: a third sketches the dominant subspace (whose trace
    is taken exactly), a third maps it, a third probes the remainder; needs
    ``num_probes >= 3``. Probes are drawn with ``seed``; products go to H in blocks.
    """
    if method not in METHODS:
        raise ValueError(f"unknown trace method {method!r}; choose from {METHODS}")
    dim = int(H.dim)
    device = device or getattr(H, "device", None)
    if method == "hutchinson":
        if num_probes < 2:
            raise ValueError("hutchinson needs at least 2 probes for a standard error")
        samples = _quadratic_forms(H, random_probes(dim, num_probes, seed, "rademacher", device))
        return TraceResult(float(samples.mean()), _stderr(samples), method, num_probes, num_probes)
    if num_probes < 3:
        raise ValueError("hutch++ needs at least 3 probes")
    sketch = min(num_probes // 3, dim)
    remaining = num_probes - 2 * sketch
    s = random_probes(dim, sketch, seed, "rademacher", device)
    q, _ = torch.linalg.qr(H.matmul(s).to(s.device, torch.float64))
    exact = float(_quadratic_forms(H, q).sum())
    if remaining < 1:
        return TraceResult(exact, 0.0, method, num_probes, 2 * sketch)
    g = random_probes(dim, remaining, seed + 1, "rademacher", device)
    orthogonalize(g, q)  # g ← (I − QQᵀ) g
    samples = _quadratic_forms(H, g)
    return TraceResult(exact + float(samples.mean()), _stderr(samples), method, num_probes,
                       2 * sketch + remaining)
