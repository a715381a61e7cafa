"""Per-class Hessian extremes during training (``--spectra-every N``).

For every class c: ``λmax`` and ``λmin`` of the Hessian of the mean plain
cross-entropy over (up to ``samples_per_class``) un-augmented training images
of class c, model in eval mode, computed with :class:`spectra.HessianOperator`
and :func:`spectra.eigenvalues` (Lanczos with a residual check). The record
also holds ``|λmin/λmax|``, the paper's saddle indicator.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..datasets import LoadedDataset, normalize

__all__ = ["PerClassSpectra"]


class PerClassSpectra:
    """Callable ``probe(model) -> {"classes": [...], "lambda_max": [...], ...}``."""

    def __init__(self, train_set: LoadedDataset, device: torch.device, samples_per_class: int = 500, batch_size: int = 250, tol: float = 1e-3, max_iter: int = 100) -> None:
        self.device = device
        self.batch_size = batch_size
        self.tol, self.max_iter = tol, max_iter
        self.per_class: list[tuple[torch.Tensor, torch.Tensor]] = []
        for c in range(train_set.num_classes):
            idx = torch.nonzero(train_set.labels == c).flatten()[:samples_per_class]
            self.per_class.append((normalize(train_set.images[idx]).to(device), train_set.labels[idx].to(device)))

    def __call__(self, model: nn.Module) -> dict[str, Any]:
        import spectra  # the analysis engine; imported late (it imports this package's siblings)

        out: dict[str, Any] = {"classes": [], "lambda_max": [], "lambda_min": [], "ratio": [], "converged": [], "num_matvecs": []}
        for c, (x, y) in enumerate(self.per_class):
            if len(y) == 0:
                continue
            H = spectra.HessianOperator(model, nn.CrossEntropyLoss(), (x, y), batch_size=self.batch_size)
            res = spectra.eigenvalues(H, k=1, which="both", tol=self.tol, max_iter=self.max_iter, seed=0)
            lmax, lmin = res.lambda_max, res.lambda_min
            out["classes"].append(c)
            out["lambda_max"].append(lmax)
            out["lambda_min"].append(lmin)
            out["ratio"].append(abs(lmin / lmax) if lmax else float("nan"))
            out["converged"].append(bool(res.converged))
            out["num_matvecs"].append(int(res.num_matvecs))
        return out
