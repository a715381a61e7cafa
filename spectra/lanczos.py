"""The Lanczos core: float64 Krylov bases with full re-orthogonalisation.

Shared by the eigenvalue solver (one block Krylov space, restarted) and by
stochastic Lanczos quadrature (many independent single-vector recurrences run
in lock-step, so that one pass over the data serves every probe).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]  # (d, k) float64 -> (d, k) float64


def random_probes(dim: int, count: int, seed: int, kind: str = "rademacher",
                  device: Optional[torch.device] = None) -> Tensor:
    """``count`` random vectors of length ``dim`` as a (dim, count) float64 block.

    Drawn on the CPU from a generator seeded with ``seed`` (identical on every
    rank and device), then moved. ``kind``: ``"rademacher"`` (±1 entries) or
    ``"gaussian"`` (standard normal entries).
    """
    gen = torch.Generator().manual_seed(int(seed))
    if kind == "rademacher":
        v = torch.randint(0, 2, (count, dim), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1
    elif kind == "gaussian":
        v = torch.randn(count, dim, generator=gen, dtype=torch.float64)
    else:
        raise ValueError(f"unknown probe kind {kind!r}; choose 'rademacher' or 'gaussian'")
    return v.T.contiguous().to(device) if device is not None else v.T.contiguous()


def orthogonalize(w: Tensor, basis: Tensor) -> Tensor:
    """Remove from the columns of ``w`` their components in span(``basis``).

    Classical Gram–Schmidt applied twice ("twice is enough"): the result is
    orthogonal to the basis to working precision. Returns the coefficients
    ``basis.T @ w_original`` summed over both passes; ``w`` is updated in place.
    """
    if basis.shape[1] == 0:
        return torch.zeros(0, w.shape[1], dtype=w.dtype, device=w.device)
    coef = basis.T @ w
    w -= basis @ coef
    again = basis.T @ w
    w -= basis @ again
    return coef + again


def orthonormal_columns(w: Tensor, basis: Tensor, seed: int, tol: float = 1e-10) -> tuple[Tensor, Tensor]:
    """QR of ``w`` (already orthogonal to ``basis``) with breakdown handling.

    Returns ``(q, r)`` with ``w = q r``. A column whose norm collapses below
    ``tol`` times the largest column norm (the space is invariant) is replaced
    by a fresh random direction orthogonal to ``basis`` and to the earlier
    columns, with a zero entry in ``r``, so the Krylov space keeps growing.
    """
    q, r = torch.linalg.qr(w)
    scale = max(float(w.norm(dim=0).max()), 1e-300)
    small = (r.diagonal().abs() <= tol * scale).nonzero().flatten().tolist()
    for j, col in enumerate(small):
        fresh = random_probes(w.shape[0], 1, seed + 7919 * (j + 1), "gaussian", w.device)
        full = torch.cat([basis, q[:, :col], q[:, col + 1:]], dim=1)
        orthogonalize(fresh, full)
        q[:, col] = (fresh / fresh.norm()).flatten()
        r[col, :] = 0.0
    return q, r


@dataclass
class Tridiagonal:
    """Lanczos tridiagonal matrices of several independent runs.

    ``alpha[p, :steps[p]]`` and ``beta[p, :steps[p]-1]`` are the diagonal and
    off-diagonal of run ``p``; a run stops early when its Krylov space becomes
    invariant (its ``beta`` vanishes).
    """

    alpha: np.ndarray
    beta: np.ndarray
    steps: np.ndarray

    def matrix(self, p: int) -> np.ndarray:
        m = int(self.steps[p])
        t = np.diag(self.alpha[p, :m])
        off = self.beta[p, :m - 1]
        return t + np.diag(off, 1) + np.diag(off, -1)


def lanczos_tridiagonal(matvec: MatVec, start: Tensor, num_steps: int,
                        basis_device: Optional[torch.device] = None,
                        progress: Optional[Callable[[int], None]] = None) -> Tridiagonal:
    """Run one Lanczos recurrence per column of ``start`` in lock-step.

    Every step multiplies all still-active runs in one block product. Each run
    keeps its own float64 basis (on ``basis_device``) and is fully
    re-orthogonalised against it, so Ritz values do not duplicate.
    """
    dim, runs = start.shape
    num_steps = min(num_steps, dim)
    device = basis_device or start.device
    q = (start / start.norm(dim=0)).to(device, torch.float64)
    basis = torch.zeros(runs, num_steps, dim, dtype=torch.float64, device=device)
    alpha = np.zeros((runs, num_steps))
    beta = np.zeros((runs, max(num_steps - 1, 0)))
    steps = np.zeros(runs, dtype=int)
    active = list(range(runs))
    for j in range(num_steps):
        basis[active, j] = q[:, active].T
        w = matvec(q[:, active]).to(device)
        still = []
        for col, p in enumerate(active):
            w_p = w[:, col:col + 1]
            coef = orthogonalize(w_p, basis[p, :j + 1].T)
            alpha[p, j] = float(coef[j])
            steps[p] = j + 1
            if j + 1 == num_steps:
                continue
            beta[p, j] = b = float(w_p.norm())
            if b > 1e-12 * max(abs(alpha[p, :j + 1]).max(), 1e-300):
                q[:, p] = (w_p / b).flatten()
                still.append(p)
            # else: invariant subspace, this run is exact and stops here
        if progress is not None:
            progress(j + 1)
        active = still
        if not active:
            break
    return Tridiagonal(alpha, beta, steps)
