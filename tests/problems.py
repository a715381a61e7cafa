"""The shared table of problem settings for engine tests (BackPACK-style).

Each problem is a small float64 model, a class-filtered data set split into
batches of unequal size, and a loss. ``dense_hessian`` is the independent
reference: ``torch.func.hessian`` of the mean loss over the flattened
parameters, computed on the concatenated data in one piece.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian

import spectra


class TinyResNet(nn.Module):
    """conv + BatchNorm + a residual branch + pooling + linear head."""

    def __init__(self, classes: int = 3, width: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.stem(x)))
        h = torch.relu(h + self.bn2(self.conv(h)))  # residual branch
        return self.head(h.mean(dim=(2, 3)))


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial running statistics and affine parameters, as after training."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
            m.weight.data.copy_(1 + 0.3 * torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(0.2 * torch.randn(m.num_features, generator=gen))


@dataclass
class Problem:
    name: str
    model: nn.Module
    batches: list[tuple[Tensor, Tensor]]
    loss_fn: Callable[[Tensor, Tensor], Tensor] = field(default_factory=nn.CrossEntropyLoss)
    params: Optional[list[str]] = None

    def operator(self, **kwargs) -> spectra.HessianOperator:
        return spectra.HessianOperator(self.model, self.loss_fn, self.batches, params=self.params, **kwargs)


def _split_unequal(x: Tensor, y: Tensor, sizes: list[int]) -> list[tuple[Tensor, Tensor]]:
    out, start = [], 0
    for s in sizes:
        out.append((x[start:start + s], y[start:start + s]))
        start += s
    out.append((x[start:], y[start:]))
    return [b for b in out if len(b[1])]


def _class_filtered(x: Tensor, y: Tensor, cls: int, sizes: list[int]) -> list[tuple[Tensor, Tensor]]:
    xs, ys = spectra.class_subset((x, y), cls)
    return _split_unequal(xs, ys, sizes)


def mlp_problem(seed: int = 0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    x = torch.randn(90, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (90,), generator=gen)
    y[:30] = 2  # make sure class 2 is well populated
    return Problem("mlp", model, _class_filtered(x, y, 2, [5, 13, 2]))


def cnn_problem(seed: int = 1, params: Optional[list[str]] = None) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TinyResNet().double()
    _randomize_bn(model, gen)
    model.eval()
    x = torch.randn(60, 3, 5, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (60,), generator=gen)
    return Problem("cnn" if params is None else "cnn-layer", model,
                   _class_filtered(x, y, 1, [7, 3, 5]), params=params)


PROBLEMS = {
    "mlp": mlp_problem,
    "cnn": cnn_problem,
    "cnn-layer": lambda: cnn_problem(params=["conv.*", "head.weight"]),
}


def flat_loss(problem: Problem) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """(θ -> mean loss over all samples, θ0) on the selected parameters."""
    model = problem.model
    names = spectra.operator.select_parameters(model, problem.params)
    state = dict(model.named_parameters())
    state.update(model.named_buffers())
    fixed = {n: t.detach() for n, t in state.items() if n not in names}
    shapes = [state[n].shape for n in names]
    theta0 = torch.cat([state[n].detach().reshape(-1) for n in names])
    x = torch.cat([b[0] for b in problem.batches])
    y = torch.cat([b[1] for b in problem.batches])

    def loss(theta: Tensor) -> Tensor:
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = theta[i:i + s.numel()].reshape(s)
            i += s.numel()
        was = model.training
        model.eval()
        try:
            return problem.loss_fn(functional_call(model, {**fixed, **params}, (x,)), y)
        finally:
            model.train(was)

    return loss, theta0


def dense_hessian(problem: Problem) -> Tensor:
    loss, theta0 = flat_loss(problem)
    h = hessian(loss)(theta0)
    return (h + h.T) / 2
