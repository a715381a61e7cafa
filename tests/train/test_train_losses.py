"""Loss formulas against hand computation; class weights and margins against
the reference values for CIFAR-10-LT (ratio 100)."""
import math

import pytest
import torch

from spectra.train.losses import LDAMLoss, VSLoss, WeightedCrossEntropy, build_loss, effective_number_weights, ldam_margins, vs_scales_and_offsets

C10_LT = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def _ce(z, y):
    """-log softmax(z)[y] by hand."""
    return -(z[y] - math.log(sum(math.exp(v) for v in z)))


def test_effective_number_weights_reference_values():
    w = effective_number_weights(C10_LT, beta=0.9999)
    assert w[0].item() == pytest.approx(0.0506, abs=5e-4)
    assert w[-1].item() == pytest.approx(3.9927, abs=5e-4)
    assert round(w[0].item(), 3) == 0.051 and round(w[-1].item(), 3) == 3.993
    assert w.sum().item() == pytest.approx(10.0, rel=1e-6)
    # definition: (1 - beta) / (1 - beta^n), normalised to sum C
    raw = [(1 - 0.9999) / (1 - 0.9999**n) for n in C10_LT]
    assert w[3].item() == pytest.approx(raw[3] / sum(raw) * 10, rel=1e-5)
    assert torch.all(w[1:] > w[:-1])  # rarer class, larger weight


def test_effective_number_weights_beta_zero_is_ones():
    assert torch.equal(effective_number_weights(C10_LT, beta=0.0), torch.ones(10))


def test_ldam_margins_reference_values():
    m = ldam_margins(C10_LT, max_margin=0.5)
    assert m[-1].item() == pytest.approx(0.5)
    assert m[0].item() == pytest.approx(0.5 * (50 / 5000) ** 0.25, rel=1e-6)
    assert round(m[0].item(), 3) == 0.158


def test_weighted_cross_entropy_by_hand():
    z = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]])
    y = torch.tensor([0, 2])
    loss = WeightedCrossEntropy(3)
    expected = (_ce(z[0].tolist(), 0) + _ce(z[1].tolist(), 2)) / 2
    assert loss(z, y).item() == pytest.approx(expected, rel=1e-6)
    loss.weight.copy_(torch.tensor([3.0, 1.0, 0.5]))
    expected_w = (3.0 * _ce(z[0].tolist(), 0) + 0.5 * _ce(z[1].tolist(), 2)) / 3.5
    assert loss(z, y).item() == pytest.approx(expected_w, rel=1e-6)


def test_ldam_loss_by_hand():
    counts = [100, 10, 1]
    z = torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.4, -0.5]])
    y = torch.tensor([2, 1])
    loss = LDAMLoss(counts, max_margin=0.5, scale=30.0)
    m = [0.5 * (1 / n**0.25) / (1 / 1**0.25) for n in counts]
    rows = []
    for zi, yi in zip(z.tolist(), y.tolist()):
        adj = [30.0 * (v - (m[yi] if c == yi else 0.0)) for c, v in enumerate(zi)]
        rows.append(_ce(adj, yi))
    assert loss(z, y).item() == pytest.approx(sum(rows) / 2, rel=1e-5)


def test_vs_loss_by_hand():
    counts = [100, 10, 1]
    gamma, tau = 0.3, 1.0
    z = torch.tensor([[0.3, -0.2, 0.1], [1.0, 0.4, -0.5]])
    y = torch.tensor([2, 0])
    loss = VSLoss(counts, gamma=gamma, tau=tau)
    total = sum(counts)
    rows = []
    for zi, yi in zip(z.tolist(), y.tolist()):
        adj = [v * (counts[c] / 100) ** gamma + tau * math.log(counts[c] / total) for c, v in enumerate(zi)]
        rows.append(_ce(adj, yi))
    assert loss(z, y).item() == pytest.approx(sum(rows) / 2, rel=1e-5)
    scale, offset = vs_scales_and_offsets(counts, gamma, tau)
    assert scale[0].item() == pytest.approx(1.0) and offset[2].item() == pytest.approx(math.log(1 / 111))


def test_build_loss_names():
    assert isinstance(build_loss("ldam", C10_LT), LDAMLoss)
    assert isinstance(build_loss("vs", C10_LT, gamma=0.2, tau=1.2), VSLoss)
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("focal", C10_LT)


def test_absent_class_keeps_losses_finite():
    loss = LDAMLoss([5, 0, 1])
    assert torch.isfinite(loss(torch.zeros(2, 3), torch.tensor([0, 2])))
