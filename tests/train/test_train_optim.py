"""SAM, SGD, PGD and LPF update rules against their formulas on a quadratic."""
import pytest
import torch

from spectra.train.noise import LPFNoise, pgd_perturbation, split_like
from spectra.train.sam import global_grad_norm, sam_perturbation
from spectra.train.sgd import TensorLRSGD

F64 = torch.float64
A = torch.tensor([[3.0, 0.5, 0.0], [0.5, -1.0, 0.2], [0.0, 0.2, 2.0]], dtype=F64)  # indefinite: a saddle


def _grad(w):
    """Gradient of L(w) = ½ wᵀ A w."""
    return A @ w


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_matches_formula_on_quadratic(adaptive):
    rho, lr, mom, wd = 0.3, 0.1, 0.9, 0.01
    w0 = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    w = torch.nn.Parameter(w0.clone())
    opt = TensorLRSGD([w], lr=lr, momentum=mom, weight_decay=wd)
    # the library's SAM step
    w.grad = _grad(w.detach())
    e = sam_perturbation([w], [w.grad], rho, adaptive=adaptive)
    with torch.no_grad():
        w.add_(e[0])
    w.grad = _grad(w.detach())
    with torch.no_grad():
        w.sub_(e[0])
    opt.step()
    # the formula: e = rho g/|g| (SAM) or rho T^2 g/|T g| (ASAM, T = |w|), step at w
    g = _grad(w0)
    if adaptive:
        T = w0.abs()
        e_ref = rho * T**2 * g / torch.linalg.norm(T * g)
    else:
        e_ref = rho * g / torch.linalg.norm(g)
    g_adv = _grad(w0 + e_ref)
    w_ref = w0 - lr * (g_adv + wd * w0)  # first momentum step: buffer = d
    assert torch.allclose(e[0], e_ref, atol=1e-12)
    assert torch.allclose(w.detach(), w_ref, atol=1e-12)


def test_sgd_matches_torch_sgd_over_steps():
    w1 = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=F64))
    w2 = torch.nn.Parameter(w1.detach().clone())
    ours = TensorLRSGD([w1], lr=0.05, momentum=0.9, weight_decay=2e-4)
    ref = torch.optim.SGD([w2], lr=0.05, momentum=0.9, weight_decay=2e-4)
    for step in range(5):
        if step == 3:
            ours.set_lr(0.01)
            ref.param_groups[0]["lr"] = 0.01
        for w, opt in ((w1, ours), (w2, ref)):
            w.grad = _grad(w.detach())
            opt.step()
    assert torch.allclose(w1, w2, atol=1e-12)


def test_sgd_state_dict_round_trip_keeps_lr_tensor():
    w = torch.nn.Parameter(torch.ones(3))
    opt = TensorLRSGD([w], lr=0.1)
    lr_tensor = opt.param_groups[0]["lr"]
    w.grad = torch.ones(3)
    opt.step()
    state = opt.state_dict()
    other = TensorLRSGD([w], lr=0.5)
    keep = other.param_groups[0]["lr"]
    other.load_state_dict(state)
    assert other.param_groups[0]["lr"] is keep and keep.item() == pytest.approx(0.1)
    assert torch.equal(other.state[w]["momentum_buffer"], opt.state[w]["momentum_buffer"])
    assert lr_tensor.item() == pytest.approx(0.1)


def test_global_grad_norm():
    grads = [torch.tensor([3.0]), torch.tensor([[4.0, 12.0]])]
    assert global_grad_norm(grads).item() == pytest.approx(13.0)


def test_pgd_perturbation_radius_and_mask():
    z = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    xi = pgd_perturbation(z, 0.5, torch.tensor(1.0))
    assert torch.linalg.norm(xi).item() == pytest.approx(0.5)
    assert torch.count_nonzero(pgd_perturbation(z, 0.5, torch.tensor(0.0))) == 0


def test_lpf_noise_scales_with_each_filters_norm():
    """LPF-SGD's code: a weight's row i (a conv filter, a linear unit) scales by its own norm,
    a vector by the whole vector's norm."""
    conv = torch.zeros(2, 1, 2, 2)
    conv[0] = 3.0 / 2  # filter norms 3 and 4
    conv[1] = 2.0
    params = [conv, torch.tensor([[3.0, 4.0], [0.0, 1.0]]), torch.full((5,), 1.0)]  # rows 5, 1; vector sqrt(5)
    z = torch.ones(8 + 4 + 5)
    eps = LPFNoise(params)(z, params, sigma=0.01)
    assert torch.allclose(eps[0][0], torch.full((1, 2, 2), 0.03)) and torch.allclose(eps[0][1], torch.full((1, 2, 2), 0.04))
    assert torch.allclose(eps[1], torch.tensor([[0.05, 0.05], [0.01, 0.01]]))
    assert torch.allclose(eps[2], torch.full((5,), 0.01 * 5**0.5))
    assert [p.shape for p in split_like(torch.arange(17.0), params)] == [(2, 1, 2, 2), (2, 2), (5,)]


def test_gradients_into_equals_zeroed_backward_bit_for_bit():
    from spectra.train.trainer import gradients_into

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3), torch.nn.Linear(3, 2))
    params = list(net.parameters())
    x = torch.randn(11, 5)
    unused = torch.nn.Parameter(torch.ones(4))  # not in the loss: its gradient is written as zeros

    def loss(scale):
        return scale * net(x).square().mean()

    for p in params:
        p.grad = torch.zeros_like(p)
    loss(1.0).backward()
    loss(0.5).backward()
    expected = [p.grad.clone() for p in params]
    grads = [torch.full_like(p, 9.0) for p in params] + [torch.full_like(unused, 9.0)]
    before = [g.data_ptr() for g in grads]
    gradients_into(grads, loss(1.0), params + [unused])
    gradients_into(grads, loss(0.5), params + [unused], accumulate=True)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected))
    assert torch.equal(grads[-1], torch.zeros(4)) and [g.data_ptr() for g in grads] == before  # in place
