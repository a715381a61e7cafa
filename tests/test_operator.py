"""HessianOperator against dense float64 Hessians (tests/problems.py)."""
import warnings

import pytest
import torch
from torch import nn

import spectra
from problems import PROBLEMS, Problem, TinyResNet, cnn_problem, dense_hessian, mlp_problem
from spectra.graphed_product import padded_rows

NAMES = list(PROBLEMS)


@pytest.mark.parametrize("method", ["auto", "forward-over-reverse", "double-backward"])
@pytest.mark.parametrize("name", NAMES)
def test_matches_dense_hessian(dense_cache, name, method):
    problem, dense = dense_cache(name)
    H = problem.operator(method=method)
    assert H.dim == dense.shape[0]
    assert H.num_samples == sum(len(b[1]) for b in problem.batches)
    torch.testing.assert_close(H.to_dense(), dense, rtol=0, atol=1e-12 * dense.abs().max())


@pytest.mark.parametrize("name", NAMES)
def test_block_product_equals_columns(dense_cache, name):
    problem, dense = dense_cache(name)
    H = problem.operator(max_block=2)
    v = torch.randn(H.dim, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    block = H @ v
    single = torch.stack([H @ v[:, j] for j in range(5)], dim=1)
    torch.testing.assert_close(block, single, rtol=0, atol=1e-13)
    torch.testing.assert_close(block, dense @ v, rtol=0, atol=1e-12 * dense.abs().max() * H.dim ** 0.5)
    assert H.num_matvecs == 10


def test_batching_does_not_change_the_operator(dense_cache):
    problem, dense = dense_cache("cnn")
    x = torch.cat([b[0] for b in problem.batches])
    y = torch.cat([b[1] for b in problem.batches])
    for data, batch_size in [((x, y), None), ((x, y), 4), (problem.batches, 6)]:
        H = spectra.HessianOperator(problem.model, problem.loss_fn, data, batch_size=batch_size)
        torch.testing.assert_close(H.to_dense(), dense, rtol=0, atol=1e-12)


def test_float32_and_device_conversion_leave_model_untouched(dense_cache):
    problem, dense = dense_cache("cnn")
    before = {k: v.clone() for k, v in problem.model.state_dict().items()}
    problem.model.train()
    H = problem.operator(dtype=torch.float32)
    assert H.dtype == torch.float32
    err = (H.to_dense() - dense).abs().max() / dense.abs().max()
    assert 0 < err < 1e-5
    assert problem.model.training and all(m.training for m in problem.model.modules())
    for k, v in problem.model.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k])
    assert next(problem.model.parameters()).dtype == torch.float64
    problem.model.eval()


def test_eval_mode_is_default_and_train_mode_differs():
    problem = cnn_problem()
    problem.model.train()
    v = torch.randn(problem.operator().dim, dtype=torch.float64)
    h_eval = problem.operator() @ v
    h_train = problem.operator(eval_mode=False) @ v
    assert problem.model.training  # mode restored
    assert (h_eval - h_train).abs().max() > 1e-3 * h_eval.abs().max()
    problem.model.eval()


def test_parameter_selection_by_pattern_and_by_tensor():
    problem = cnn_problem()
    H = spectra.HessianOperator(problem.model, problem.loss_fn, problem.batches,
                                params=["conv.*", "head.weight"])
    assert H.param_names == ["conv.weight", "head.weight"]
    H2 = spectra.HessianOperator(problem.model, problem.loss_fn, problem.batches,
                                 params=[problem.model.conv.weight, problem.model.head.weight])
    assert H2.param_names == H.param_names
    with pytest.raises(ValueError, match="no trainable parameter matches"):
        spectra.HessianOperator(problem.model, problem.loss_fn, problem.batches, params="nope.*")


def test_loss_and_gradient_are_means_over_all_samples():
    problem = mlp_problem()
    H = problem.operator()
    x = torch.cat([b[0] for b in problem.batches])
    y = torch.cat([b[1] for b in problem.batches])
    with torch.no_grad():
        expected = float(problem.loss_fn(problem.model(x), y))
    assert H.loss() == pytest.approx(expected, rel=1e-12)
    problem.model.zero_grad()
    problem.loss_fn(problem.model(x), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in problem.model.parameters()])
    torch.testing.assert_close(H.gradient(), g, rtol=1e-10, atol=1e-14)


def test_bad_input_errors():
    problem = mlp_problem()
    with pytest.raises(ValueError, match="unknown method"):
        problem.operator(method="magic")
    H = problem.operator()
    with pytest.raises(ValueError, match="expected a vector of shape"):
        H @ torch.zeros(H.dim + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="empty"):
        spectra.HessianOperator(problem.model, problem.loss_fn, [])
    with pytest.raises(ValueError, match="no parameters"):
        spectra.HessianOperator(nn.ReLU(), problem.loss_fn, problem.batches)


def test_uncached_data_gives_the_same_products(dense_cache):
    problem, dense = dense_cache("mlp")
    H = problem.operator(cache_data=False)
    torch.testing.assert_close(H.to_dense(), dense, rtol=0, atol=1e-12)


def test_compiled_products_with_padded_static_batches(dense_cache):
    """compile=True pads every batch to batch_size rows; the padding is exact."""
    problem, dense = dense_cache("mlp")
    H = problem.operator(compile=True, batch_size=16)
    shapes = {tuple(x.shape) for x, _, _ in H._product_batches()}
    assert shapes == {(16, 6)}  # one static shape: one compilation
    v = torch.randn(H.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(H @ v, dense @ v, rtol=0, atol=1e-12 * dense.abs().max() * H.dim ** 0.5)


def test_graphs_pad_to_power_of_two_buckets_exactly(dense_cache):
    """graphs=True (eager on a CPU) pads each batch to a power-of-two bucket ≤ batch_size; exact."""
    problem, dense = dense_cache("cnn")
    with pytest.warns(RuntimeWarning, match="CUDA graphs need a CUDA device"):
        H = problem.operator(graphs=True, batch_size=8)
    sizes = [len(y) for _, y in H.batches()]
    shapes = [len(y) for _, y, _ in H._product_batches()]
    assert shapes == [padded_rows(n, 8) for n in sizes] and any(s > n for s, n in zip(shapes, sizes))
    v = torch.randn(H.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(H @ v, dense @ v, rtol=0, atol=1e-12 * dense.abs().max() * H.dim ** 0.5)
    torch.testing.assert_close(H @ v[:, 0], dense @ v[:, 0], rtol=0, atol=1e-12 * dense.abs().max() * H.dim ** 0.5)


def _mixed_classes_with_class_weights():
    """The mlp model, 10 rows of 4 classes and a class-weighted CE: padding them is inexact."""
    problem = mlp_problem()
    x = torch.cat([b[0] for b in problem.batches])[:10]
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    return problem, x, y, weighted


def test_padding_refuses_a_class_weighted_loss_over_mixed_classes():
    """Repeating rows changes a class-weighted mean: padding such a batch would be silently wrong."""
    problem, x, y, weighted = _mixed_classes_with_class_weights()
    H = spectra.HessianOperator(problem.model, weighted, (x, y), batch_size=8, compile=True)
    with pytest.raises(ValueError, match="plain mean over samples"):
        H @ torch.ones(H.dim, dtype=torch.float64)
    # one class per batch (per-class Hessians): the weights are constant, padding is exact
    same = torch.full_like(y, 2)
    H = spectra.HessianOperator(problem.model, weighted, (x, same), batch_size=8, compile=True)
    reference = spectra.HessianOperator(problem.model, weighted, (x, same))
    v = torch.randn(H.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(H @ v, reference @ v, rtol=1e-10, atol=1e-12)


def test_check_static_shapes_raises_before_any_product():
    """check_static_shapes() runs the padding check up front (the analyses' default graphs fall back
    on it); it is a no-op without padding: no compile/graphs, or no batch that needs padding."""
    problem, x, y, weighted = _mixed_classes_with_class_weights()
    H = spectra.HessianOperator(problem.model, weighted, (x, y), batch_size=8, compile=True)
    with pytest.raises(ValueError, match="plain mean over samples"):
        H.check_static_shapes()
    assert H.num_matvecs == 0
    spectra.HessianOperator(problem.model, weighted, (x, y), batch_size=8).check_static_shapes()
    spectra.HessianOperator(problem.model, weighted, (x[:8], y[:8]), batch_size=8, compile=True).check_static_shapes()
    same = spectra.HessianOperator(problem.model, weighted, (x, torch.full_like(y, 2)), batch_size=8, compile=True)
    same.check_static_shapes()
    assert same._row_mean_checked


def test_with_data_shares_the_product_and_gives_the_other_hessian(dense_cache):
    problem, dense = dense_cache("cnn")
    other = cnn_problem(seed=1)
    x = torch.cat([b[0] for b in other.batches])
    y = torch.cat([b[1] for b in other.batches])
    H = problem.operator(batch_size=4)
    v = torch.randn(H.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    H @ v
    half = H.with_data((x[:5], y[:5]))
    assert half._product is H._product and half.model is H.model
    assert half.num_samples == 5 and half.num_matvecs == 0 and H.num_matvecs == 1
    fresh = spectra.HessianOperator(problem.model, problem.loss_fn, (x[:5], y[:5]), batch_size=4)
    torch.testing.assert_close(half @ v, fresh @ v, rtol=0, atol=1e-13)
    torch.testing.assert_close(H @ v, dense @ v, rtol=0, atol=1e-12 * dense.abs().max() * H.dim ** 0.5)
    with pytest.raises(ValueError, match="empty"):
        H.with_data([])


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("name", ["cnn", "cnn-layer"])
def test_load_weights_gives_the_other_models_hessian_through_the_same_products(dense_cache, name, graphs):
    """load_weights(next checkpoint's model): this operator and its with_data operators, with the
    same (captured) products, give the other model's dense Hessian; the callers' models are untouched."""
    problem, _ = dense_cache(name)
    other = cnn_problem(seed=2, params=problem.params)
    before = {n: t.clone() for n, t in problem.model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # graphs on a CPU: padded products run eagerly
        H = problem.operator(method="forward-over-reverse", graphs=graphs, batch_size=4)
    H @ torch.ones(H.dim, dtype=torch.float64)
    product = H._product
    assert H.owns_weights
    H.load_weights(other.model)
    expected = dense_hessian(Problem(name, other.model, problem.batches, params=problem.params))
    scale = expected.abs().max() * H.dim ** 0.5
    torch.testing.assert_close(H.to_dense(), expected, rtol=0, atol=1e-12 * scale)
    assert H._product is product
    half = H.with_data(other.batches[:1])
    expected_half = dense_hessian(Problem(name, other.model, other.batches[:1], params=problem.params))
    torch.testing.assert_close(half.to_dense(), expected_half, rtol=0, atol=1e-12 * scale)
    assert all(torch.equal(t, before[n]) for n, t in problem.model.state_dict().items())


def test_load_weights_refuses_another_architecture_or_the_callers_tensors(dense_cache):
    problem, _ = dense_cache("cnn")
    H = problem.operator()
    with pytest.raises(ValueError, match="same architecture"):
        H.load_weights(mlp_problem().model)
    with pytest.raises(ValueError, match="same architecture"):
        H.load_weights(TinyResNet(width=5).double())
    mlp = mlp_problem()  # float64, no BatchNorm: used as it is, not copied
    H = mlp.operator()
    assert not H.owns_weights
    with pytest.raises(ValueError, match="caller's model tensors"):
        H.load_weights(mlp_problem(seed=1).model)


def test_auto_method_uses_double_backward_on_a_cpu(dense_cache, monkeypatch):
    problem, dense = dense_cache("cnn")
    H = problem.operator()
    assert H.method == "auto" and not H.uses_vmap
    calls = []
    for name in ("_hvp_forward_over_reverse", "_hvp_double_backward"):
        original = getattr(H, name)
        monkeypatch.setattr(H, name, lambda *a, _o=original, _n=name: calls.append(_n) or _o(*a))
    v = torch.randn(H.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    scale = 1e-12 * dense.abs().max() * H.dim ** 0.5
    torch.testing.assert_close(H @ v[:, 0], dense @ v[:, 0], rtol=0, atol=scale)
    torch.testing.assert_close(H @ v, dense @ v, rtol=0, atol=scale)
    batches = len(problem.batches)
    assert calls == ["_hvp_double_backward"] * (2 * batches)
    with pytest.warns(RuntimeWarning, match="CUDA graphs need a CUDA device"):
        assert problem.operator(graphs=True).method == "forward-over-reverse"  # the product that is captured
    assert problem.operator(eval_mode=False).method == "double-backward"


@pytest.mark.parametrize("name", NAMES)
def test_kept_gradient_graphs_give_the_same_products(dense_cache, name):
    """keep_graph: the first product builds each batch's gradient graph, later ones only backpropagate."""
    problem, dense = dense_cache(name)
    H = problem.operator(keep_graph=True)
    plain = problem.operator(method="double-backward")
    v = torch.randn(H.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    for cols in (v[:, 0], v, v[:, 1]):
        torch.testing.assert_close(H @ cols, plain @ cols, rtol=0, atol=0)
    assert len(H._kept_graphs) == len(problem.batches)
    torch.testing.assert_close(H @ v, dense @ v, rtol=0, atol=1e-12 * dense.abs().max() * H.dim ** 0.5)
    with pytest.raises(ValueError, match="keep_graph=True needs double-backward"):
        problem.operator(keep_graph=True, method="forward-over-reverse")
    with pytest.raises(ValueError, match="keep_graph=True needs double-backward"):
        problem.operator(keep_graph=True, cache_data=False)


def test_graph_is_kept_by_default_only_for_one_batch(dense_cache):
    """keep_graph=None keeps the gradient graph iff the products are double backward on one cached batch."""
    problem, dense = dense_cache("cnn")
    assert len(problem.batches) > 1 and not problem.operator().keeps_graphs
    x = torch.cat([b[0] for b in problem.batches])
    y = torch.cat([b[1] for b in problem.batches])
    one = spectra.HessianOperator(problem.model, problem.loss_fn, (x, y), params=problem.params)
    assert one.keeps_graphs and len(one._kept_graphs) == 0
    v = torch.randn(one.dim, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(one @ v, dense @ v, rtol=0, atol=1e-12 * dense.abs().max() * one.dim ** 0.5)
    assert len(one._kept_graphs) == 1
    rebuilt = spectra.HessianOperator(problem.model, problem.loss_fn, (x, y), params=problem.params, keep_graph=False)
    torch.testing.assert_close(one @ v[:, 0], rebuilt @ v[:, 0], rtol=0, atol=0)  # bit-identical
    assert not rebuilt.keeps_graphs
    assert not one.with_data(problem.batches).keeps_graphs  # re-resolved for the new data
    assert one.with_data((x[:5], y[:5])).keeps_graphs
    assert not problem.operator(method="forward-over-reverse").keeps_graphs
    assert not spectra.HessianOperator(problem.model, problem.loss_fn, (x, y), params=problem.params,
                                       cache_data=False).keeps_graphs


def test_one_shot_data_needs_cache_data(dense_cache):
    """A generator read for every product was exhausted after counting: H was 0, "converged"."""
    problem, dense = dense_cache("mlp")

    def generator():
        yield from problem.batches

    with pytest.raises(ValueError, match="one-shot iterator.*cache_data=True"):
        spectra.HessianOperator(problem.model, problem.loss_fn, generator(), cache_data=False)
    with pytest.raises(ValueError, match="one-shot iterator"):
        spectra.HessianOperator(problem.model, problem.loss_fn, iter(problem.batches), cache_data=False)
    cached = spectra.HessianOperator(problem.model, problem.loss_fn, generator())  # read once, kept
    torch.testing.assert_close(cached.to_dense(), dense, rtol=0, atol=1e-12)
    uncached = problem.operator(cache_data=False)
    with pytest.raises(ValueError, match="one-shot iterator"):
        uncached.with_data(generator())


class _ReadOnce:
    """Re-iterable in form (``iter(data) is not data``) but empty from the second pass on."""

    def __init__(self, batches):
        self._pass = iter([list(batches)])

    def __iter__(self):
        return iter(next(self._pass, []))


def test_a_product_over_fewer_samples_than_counted_raises(dense_cache):
    problem, _ = dense_cache("mlp")
    H = spectra.HessianOperator(problem.model, problem.loss_fn, _ReadOnce(problem.batches), cache_data=False)
    assert H.num_samples == sum(len(b[1]) for b in problem.batches)
    with pytest.raises(RuntimeError, match=r"gave 0 samples on this pass but \d+"):
        H @ torch.ones(H.dim, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="gave 0 samples"):
        H.loss()


class DropPath(nn.Module):
    """Stochastic depth as timm writes it: a module named *Drop* with a probability ``p``."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x):
        keep = (torch.rand(len(x), 1, dtype=x.dtype) >= self.p).to(x.dtype) if self.training else 1.0
        return x * keep


@pytest.mark.parametrize("layer", [nn.Dropout(0.5), nn.AlphaDropout(0.2), nn.RReLU(), DropPath(0.1)])
def test_train_mode_with_stochastic_layers_is_refused(layer):
    """A random loss has no Hessian: the result depended on keep_graph (one frozen mask or a new one per product)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), layer, nn.Tanh(), nn.Linear(4, 3)).double()
    data = (torch.randn(20, 3, 2, 2, dtype=torch.float64), torch.randint(0, 3, (20,)))
    with pytest.raises(ValueError, match=f"stochastic layers \\({type(layer).__name__}\\).*eval_mode=True"):
        spectra.HessianOperator(model, nn.CrossEntropyLoss(), data, eval_mode=False)
    H = spectra.HessianOperator(model, nn.CrossEntropyLoss(), data)  # eval mode: dropout off, one matrix
    v = torch.randn(H.dim, dtype=torch.float64)
    torch.testing.assert_close(H @ v, H @ v, rtol=0, atol=0)
    model[2] = nn.Dropout(0.0)  # p = 0 draws nothing: train mode is a fixed matrix
    assert spectra.HessianOperator(model, nn.CrossEntropyLoss(), data, eval_mode=False).dim == H.dim


def test_every_params_pattern_must_match():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    assert spectra.operator.select_parameters(model, ["0.weight", "1.*"]) == ["0.weight", "1.weight", "1.bias"]
    with pytest.raises(ValueError, match=r"no trainable parameter matches '1\.wieght'$"):
        spectra.operator.select_parameters(model, ["0.weight", "1.wieght"])
    with pytest.raises(ValueError, match=r"'x', 'y\*'$"):
        spectra.operator.select_parameters(model, ["x", "0.bias", "y*"])


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_a_loss_that_does_not_average_is_refused(reduction):
    """reduction='sum' would scale the Hessian by the batch sizes; the operator averages itself."""
    model = nn.Linear(4, 3)
    data = [(torch.randn(5, 4), torch.randint(0, 3, (5,)))]
    with pytest.raises(ValueError, match=f"reduction={reduction!r}"):
        spectra.HessianOperator(model, nn.CrossEntropyLoss(reduction=reduction), data)


def test_half_precision_products_warn():
    model = nn.Linear(4, 3)
    data = [(torch.randn(5, 4), torch.randint(0, 3, (5,)))]
    with pytest.warns(RuntimeWarning, match="bfloat16 carry ~1e-3"):
        spectra.HessianOperator(model, nn.CrossEntropyLoss(), data, dtype=torch.bfloat16)
