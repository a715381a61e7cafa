"""CIFAR ResNets (He et al. 2016, option-A shortcuts) and the model registry.

The registry maps an architecture name to a constructor; checkpoints store the
name and its keyword arguments (``arch``, ``arch_kwargs``) so that any tool can
rebuild the network with :func:`build_model` and load the ``state_dict``.

Besides the built-ins (``resnet20``, ``resnet32``, ``resnet44``, ``resnet56``,
``resnet110``), a name may be an import spec ``package.module:Attr``; ``Attr``
is called with the keyword arguments (a class or a factory function).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .import_spec import import_callable

__all__ = [
    "NormedLinear",
    "BasicBlock",
    "CifarResNet",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "MODELS",
    "build_model",
]


class NormedLinear(nn.Module):
    """Cosine classifier head: ``logits = normalize(x) @ normalize(W)``.

    Each logit is the cosine between the feature vector and a class weight
    column, so logits lie in [-1, 1]; LDAM multiplies them by its scale ``s``.
    The weight has shape ``(in_features, out_features)`` as in the LDAM-DRW
    reference code, initialised uniform(-1, 1) with unit-norm columns.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        with torch.no_grad():
            self.weight.uniform_(-1.0, 1.0)
            self.weight.div_(self.weight.norm(dim=0, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class _OptionAShortcut(nn.Module):
    """Parameter-free shortcut: subsample by 2 in space, zero-pad channels.

    ``x[:, :, ::2, ::2]`` halves the resolution and ``pad`` channels of zeros
    are added on each side, so ``C -> C + 2·pad`` (option A of He et al.).
    """

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with a ReLU between, plus the shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = _OptionAShortcut((planes - in_planes) // 2)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _kaiming_init(module: nn.Module) -> None:
    # Kaiming-normal (fan_in, ReLU gain) on every conv and linear weight, as in
    # the reference CIFAR ResNet; the cosine head keeps its own init.
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight)


class CifarResNet(nn.Module):
    """ResNet for 32×32 inputs: conv 16 → 3 stages of basic blocks (16/32/64
    channels, strides 1/2/2) → global average pool → linear (or cosine) head.

    Depth = 6·n + 2 for ``num_blocks = [n, n, n]`` (n = 5 gives ResNet-32).
    """

    def __init__(
        self,
        num_blocks: list[int] | tuple[int, int, int] = (5, 5, 5),
        num_classes: int = 10,
        cosine_head: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.cosine_head = cosine_head
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        stages = []
        for planes, n, stride in zip((16, 32, 64), num_blocks, (1, 2, 2)):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(BasicBlock(in_planes, planes, s))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.apply(_kaiming_init)
        # The head is created after the init so the cosine head keeps its own.
        self.linear: nn.Module = NormedLinear(64, num_classes) if cosine_head else nn.Linear(64, num_classes)
        if not cosine_head:
            _kaiming_init(self.linear)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 64-dimensional pooled feature vector before the head."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


def _cifar_resnet(n: int) -> Callable[..., CifarResNet]:
    def make(num_classes: int = 10, cosine_head: bool = False) -> CifarResNet:
        return CifarResNet((n, n, n), num_classes=num_classes, cosine_head=cosine_head)

    make.__name__ = f"resnet{6 * n + 2}"
    make.__doc__ = f"ResNet-{6 * n + 2} for CIFAR (blocks [{n}, {n}, {n}], option-A shortcuts)."
    return make


resnet8 = _cifar_resnet(1)  # the smallest: CPU demos and benchmarks
resnet20 = _cifar_resnet(3)
resnet32 = _cifar_resnet(5)
resnet44 = _cifar_resnet(7)
resnet56 = _cifar_resnet(9)
resnet110 = _cifar_resnet(18)

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet8": resnet8,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate an architecture by registry name or ``package.module:Attr``.

    >>> build_model("resnet32", num_classes=10).linear.out_features
    10
    """
    if name in MODELS:
        return MODELS[name](**kwargs)
    if ":" in name:
        model = import_callable(name, "architecture")(**kwargs)
        if not isinstance(model, nn.Module):
            raise ValueError(f"{name!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    raise ValueError(f"unknown architecture {name!r}; built-ins: {', '.join(MODELS)} (or 'package.module:Class')")
