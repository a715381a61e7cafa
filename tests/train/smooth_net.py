"""A small network without ReLU kinks, for tests that compare two training
computations step by step.

With ReLU networks a float rounding difference of 1e-7 can move an activation
across the kink at 0, after which two correct computations follow different
paths (seen on resnet8 with SAM + DRW: 0.3 % gradient difference in one step,
where a float64 reference sided with one of them; on ResNet-32 at
initialisation, the two ways of normalising the input —
``(x/255 − mean)/std`` and ``(x − 255·mean)·1/(255·std)`` — give gradients
0.2 % apart). tanh has no such flips, so a comparison isolates the arithmetic.
Usable as ``arch="smooth_net:SmoothNet"`` (an import spec).
"""
import torch
import torch.nn.functional as F
from torch import nn

from spectra.models import NormedLinear


class SmoothNet(nn.Module):
    """conv-BN-tanh, strided conv-BN-tanh, average pool, linear or cosine head
    (BatchNorm included: its running statistics are part of what is compared)."""

    def __init__(self, num_classes: int = 10, cosine_head: bool = False) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc = NormedLinear(16, num_classes) if cosine_head else nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.b2(self.c2(torch.tanh(self.b1(self.c1(x))))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
