"""SGD with momentum and weight decay whose learning rate is a tensor, so the
whole update can be captured in a CUDA graph and the rate changed between replays.

Update (PyTorch ``torch.optim.SGD`` semantics, dampening 0, no Nesterov)::

    d = g + wd · w;   b ← μ · b + d;   w ← w − lr · b

(PyTorch initialises ``b = d`` on the first step, which equals ``μ·0 + d``.)
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

__all__ = ["TensorLRSGD"]


class TensorLRSGD(torch.optim.Optimizer):
    """Momentum SGD over one parameter group; ``lr`` is a 0-dim tensor (``set_lr``)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, momentum: float = 0.9, weight_decay: float = 0.0) -> None:
        params = list(params)
        device = params[0].device if params else torch.device("cpu")
        super().__init__(params, {"lr": torch.tensor(float(lr), device=device), "momentum": momentum, "weight_decay": weight_decay})
        for p in self.param_groups[0]["params"]:
            # Buffers exist from the start: no allocation inside a captured step.
            self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def set_lr(self, lr: float) -> None:
        self.param_groups[0]["lr"].fill_(lr)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        group = self.param_groups[0]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        if group["weight_decay"]:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        torch._foreach_mul_(bufs, group["momentum"])
        torch._foreach_add_(bufs, grads)
        torch._foreach_sub_(params, torch._foreach_mul(bufs, group["lr"]))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        lr = self.param_groups[0]["lr"]
        super().load_state_dict(state_dict)
        # Keep the lr tensor object that a captured graph reads; copy the value.
        loaded = self.param_groups[0]["lr"]
        lr.copy_(loaded if isinstance(loaded, torch.Tensor) else torch.tensor(float(loaded)))
        self.param_groups[0]["lr"] = lr
