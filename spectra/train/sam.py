"""Sharpness-aware minimisation (Foret et al. 2021), the perturbation step.

SAM evaluates the gradient at ``w_adv = w + e`` with

* SAM:  ``e = ρ · g / ‖g‖₂``
* ASAM (adaptive, Kwon et al. 2021): ``e = ρ · T² g / ‖T g‖₂``, ``T = |w|``,

norms taken over all parameters together, then applies the base optimiser's
step at ``w`` (weight decay at ``w``) with that gradient. Everything here is
tensor arithmetic without host synchronisation, so it can be graph-captured.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["sam_perturbation", "global_grad_norm"]


def global_grad_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """``‖(g_1, …, g_k)‖₂`` over all tensors, as a 0-dim tensor."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(grads))))


@torch.no_grad()
def sam_perturbation(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    rho: float | torch.Tensor,
    adaptive: bool = False,
    eps: float = 1e-12,
) -> list[torch.Tensor]:
    """The ascent step ``e`` (one tensor per parameter); add it, take the
    gradient, subtract it. ``eps`` guards a zero gradient (as the reference)."""
    if adaptive:
        scaled = torch._foreach_mul(list(grads), torch._foreach_abs(list(params)))
        norm = global_grad_norm(scaled)
        e = torch._foreach_mul(scaled, torch._foreach_abs(list(params)))
        torch._foreach_mul_(e, rho / (norm + eps))
        return e
    # one multi-tensor kernel (not a clone per tensor): steps are launch-bound on GPUs
    return torch._foreach_mul(list(grads), rho / (global_grad_norm(grads) + eps))
