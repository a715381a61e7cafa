"""Per-class analysis jobs on tiny checkpoints and data (tests/tiny_runs.py),
against dense Hessians computed independently of the operator."""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
import torch

from spectra.analysis import AnalysisError, AnalysisSettings, analyse_checkpoint
from spectra.checkpoints import load_checkpoint
from spectra.class_data import DataOptions
from spectra.datasets import DatasetSpec, load_dataset, normalize

from tiny_runs import tiny_run


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The tiny 3-checkpoint run of tests/tiny_runs.py, shared by this module's tests."""
    return tiny_run(tmp_path_factory.mktemp("analysis"))


FAST = AnalysisSettings(kind="eigs", tol=1e-6, dtype="float64", max_iter=120)


def _class3_flat_loss(env, logits_loss):
    """θ -> ``logits_loss(model_θ(x), y)`` over class 3 at the last checkpoint, with θ0 and
    the class mask: the independent reference of the dense tests (no operator involved)."""
    ck = load_checkpoint(env["run"][-1])
    data = load_dataset(DatasetSpec("cifar10", root=str(env["root"])))
    mask = data.labels == 3
    x, y = normalize(data.images[mask]).double(), data.labels[mask]
    model = ck.model.double().eval()
    shapes = [(n, p.shape, p.numel()) for n, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    buffers = dict(model.named_buffers())

    def loss(theta):
        params, i = {}, 0
        for n, shape, numel in shapes:
            params[n] = theta[i:i + numel].view(shape)
            i += numel
        return logits_loss(torch.func.functional_call(model, {**buffers, **params}, (x,)), y)

    return loss, flat, mask, data


@pytest.fixture(scope="module")
def dense(env):
    """The dense Hessian of class 3's mean CE at the last checkpoint, computed
    independently of the operator (torch.func.hessian over the flat parameters)."""
    loss, flat, mask, data = _class3_flat_loss(env, torch.nn.functional.cross_entropy)
    matrix = torch.func.hessian(loss)(flat)
    ids = data.indices[mask].numpy().astype("<i8")
    return {"matrix": matrix, "evals": torch.linalg.eigvalsh(matrix), "loss": float(loss(flat)),
            "n": int(mask.sum()), "ids_sha": hashlib.sha256(ids.tobytes()).hexdigest()}


def test_eigs_match_dense_hessian_of_class_subset(env, dense):
    (rec,) = analyse_checkpoint(env["run"][-1], "3", FAST, DataOptions(root=str(env["root"]), device="cpu"))
    evals = dense["evals"]
    assert rec.arrays["top"][0] == pytest.approx(float(evals[-1]), rel=1e-6)
    assert rec.arrays["bottom"][0] == pytest.approx(float(evals[0]), rel=1e-5, abs=1e-9)
    p = rec.provenance
    assert p["num_samples"] == dense["n"] == 6
    assert p["num_params"] == dense["matrix"].shape[0]
    assert p["loss"] == pytest.approx(dense["loss"], rel=1e-10)
    assert p["sample_indices_sha256"] == dense["ids_sha"]
    assert p["checkpoint_format"] == "spectra" and p["epoch"] == 3 and p["run"] == "run-ce"
    assert p["class_name"] == "cat" and p["dataset"]["name"] == "cifar10" and p["converged"]


def test_density_and_trace_records(env, dense):
    opts = DataOptions(root=str(env["root"]), device="cpu")
    (dens,) = analyse_checkpoint(env["run"][-1], "cat", AnalysisSettings(kind="density", probes=2, steps=12), opts)
    assert dens.arrays["nodes"].shape == (2, 12) and dens.arrays["values"].shape == dens.arrays["grid"].shape
    np.testing.assert_allclose(dens.arrays["weights"].sum(axis=1), 1.0, rtol=1e-6)
    # Ritz values lie inside the spectrum.
    lo, hi = float(dense["evals"][0]), float(dense["evals"][-1])
    slack = 1e-4 * (hi - lo)
    assert lo - slack <= dens.arrays["nodes"].min() and dens.arrays["nodes"].max() <= hi + slack
    (tr,) = analyse_checkpoint(env["run"][-1], "3", AnalysisSettings(kind="trace", trace_probes=90, dtype="float64"),
                               opts)
    exact = float(torch.trace(dense["matrix"]))
    assert float(tr.arrays["estimate"]) == pytest.approx(exact, abs=4 * float(tr.arrays["stderr"]) + 1e-6 * abs(exact))
    assert tr.provenance["algorithm"] == "hutch++"


def test_param_restriction_and_max_samples(env):
    settings = AnalysisSettings(kind="eigs", tol=1e-6, dtype="float64", params=("linear.*",))
    (rec,) = analyse_checkpoint(env["run"][0], "0", settings,
                                DataOptions(root=str(env["root"]), device="cpu", max_samples=4))
    assert rec.provenance["num_params"] == 64 * 10 + 10
    assert rec.provenance["num_samples"] == 4
    # The head-only Hessian of CE is a Gauss-Newton term: positive semi-definite.
    assert rec.arrays["bottom"][0] > -1e-8


def test_non_finite_loss_is_refused(env, tmp_path):
    ck = torch.load(env["run"][0], weights_only=True)
    ck["state_dict"]["linear.bias"][0] = float("nan")
    bad = tmp_path / "ckpt_epoch0001.pt"
    torch.save(ck, bad)
    with pytest.raises(AnalysisError, match="loss is not finite"):
        analyse_checkpoint(bad, "0", FAST, DataOptions(root=str(env["root"]), device="cpu"))


def test_ldam_loss_hessian_matches_dense(env, dense):
    """--loss ldam: CE(s·(z − m_y e_y), y) with margins from the class counts (all equal here: m = 0.5, s = 30)."""
    def ldam(z, y):
        return torch.nn.functional.cross_entropy(30.0 * (z - 0.5 * torch.nn.functional.one_hot(y, 10)), y)

    loss, flat, _, _ = _class3_flat_loss(env, ldam)
    evals = torch.linalg.eigvalsh(torch.func.hessian(loss)(flat))
    settings = AnalysisSettings(kind="eigs", tol=1e-8, dtype="float64", max_iter=200, loss="ldam")
    (rec,) = analyse_checkpoint(env["run"][-1], "3", settings, DataOptions(root=str(env["root"]), device="cpu"))
    scale = float(evals.abs().max())
    assert abs(rec.arrays["top"][0] - float(evals[-1])) <= 1e-7 * scale
    assert abs(rec.arrays["bottom"][0] - float(evals[0])) <= 1e-7 * scale
    assert rec.provenance["loss_fn"] == "ldam"
    assert abs(rec.arrays["top"][0] - float(dense["evals"][-1])) > 1e-3 * scale  # not the CE Hessian


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    """Analyses take the CUDA-graph path on the CPU (padded products run eagerly: a stand-in for the
    capture), starting without a cached operator: one left by an earlier test would be reused
    (with_data, load_weights) and change what a test counts."""
    from spectra import analysis

    monkeypatch.setattr(analysis, "_graphs_supported", lambda device: True)
    monkeypatch.setitem(analysis._GRAPHED, "operator", None)


def test_cuda_graph_products_are_shared_across_classes_and_change_nothing(env, dense, monkeypatch, graphs_on_cpu):
    """cuda_graphs: the second class reuses the first class's operator products (with_data);
    results equal the eager ones. Off CUDA the setting is ignored; here the padded static-shape
    products run eagerly (a CPU stand-in for the capture) to exercise the sharing."""
    import spectra

    opts = DataOptions(root=str(env["root"]), device="cpu", batch_size=4)
    eager = analyse_checkpoint(env["run"][-1], "3,5", dataclasses.replace(FAST, cuda_graphs=False), opts)
    shared = []
    with_data = spectra.HessianOperator.with_data
    monkeypatch.setattr(spectra.HessianOperator, "with_data", lambda self, *a, **k: shared.append(self) or with_data(self, *a, **k))
    graphed_settings = AnalysisSettings(kind="eigs", tol=1e-6, dtype="float64", max_iter=120, cuda_graphs=True)
    with pytest.warns(RuntimeWarning, match="CUDA graphs need a CUDA device"):
        graphed = analyse_checkpoint(env["run"][-1], "3,5", graphed_settings, opts)
    assert len(shared) == 1 and shared[0].graphs
    for a, b in zip(eager, graphed):
        np.testing.assert_allclose(b.arrays["top"], a.arrays["top"], rtol=1e-9)
        np.testing.assert_allclose(b.arrays["bottom"], a.arrays["bottom"], rtol=1e-9, atol=1e-9 * abs(a.arrays["top"][0]))
    assert graphed[0].provenance["settings_hash"] == eager[0].provenance["settings_hash"]
    np.testing.assert_allclose(graphed[0].arrays["top"][0], float(dense["evals"][-1]), rtol=1e-8)
    with pytest.raises(AnalysisError, match="forward-over-reverse"):
        AnalysisSettings(cuda_graphs=True, hvp_method="double-backward")


def test_cuda_graph_products_are_shared_across_checkpoints_of_one_architecture(env, monkeypatch, graphs_on_cpu):
    """The next checkpoint of the same architecture reuses the captured products: its weights are
    loaded into them (one operator built, one load_weights), and every result equals the eager one."""
    import spectra

    opts = DataOptions(root=str(env["root"]), device="cpu", batch_size=4)
    paths = env["run"][-2:]
    eager = [analyse_checkpoint(p, "3,5", dataclasses.replace(FAST, cuda_graphs=False), opts) for p in paths]
    built, loaded = [], []
    init, load = spectra.HessianOperator.__init__, spectra.HessianOperator.load_weights
    monkeypatch.setattr(spectra.HessianOperator, "__init__", lambda self, *a, **k: built.append(1) or init(self, *a, **k))
    monkeypatch.setattr(spectra.HessianOperator, "load_weights", lambda self, m: loaded.append(1) or load(self, m))
    with pytest.warns(RuntimeWarning, match="CUDA graphs need a CUDA device"):
        graphed = [analyse_checkpoint(p, "3,5", FAST, opts) for p in paths]
    assert len(built) == 1 and len(loaded) == 1
    assert eager[0][0].arrays["top"][0] != pytest.approx(eager[1][0].arrays["top"][0], rel=1e-6)  # checkpoints differ
    for records, expected in zip(graphed, eager):
        for b, a in zip(records, expected):
            np.testing.assert_allclose(b.arrays["top"], a.arrays["top"], rtol=1e-9)
            np.testing.assert_allclose(b.arrays["bottom"], a.arrays["bottom"], rtol=1e-9,
                                       atol=1e-9 * abs(a.arrays["top"][0]))


@pytest.mark.parametrize("settings, arrays", [
    (AnalysisSettings(kind="density", probes=3, steps=10, dtype="float64"), ("nodes", "weights")),
    (AnalysisSettings(kind="trace", trace_probes=12, dtype="float64"), ("estimate", "stderr")),
])
def test_density_and_trace_through_graph_products_equal_eager(env, graphs_on_cpu, settings, arrays):
    """Densities (blocks of probes) and Hutch++ (blocks of several widths: one captured shape each)
    through the default graph products give the eager results (same seed)."""
    opts = DataOptions(root=str(env["root"]), device="cpu", batch_size=4)
    eager = analyse_checkpoint(env["run"][-1], "3", dataclasses.replace(settings, cuda_graphs=False), opts)
    with pytest.warns(RuntimeWarning, match="CUDA graphs need a CUDA device"):
        graphed = analyse_checkpoint(env["run"][-1], "3", settings, opts)
    assert graphed[0].provenance["settings_hash"] == eager[0].provenance["settings_hash"]
    for name in arrays:
        np.testing.assert_allclose(graphed[0].arrays[name], eager[0].arrays[name], rtol=1e-9, atol=1e-12)


def test_default_graphs_fall_back_to_eager_when_padding_would_be_inexact(env, monkeypatch, graphs_on_cpu):
    """cuda_graphs=None: an operator whose padded batches would be inexact is rebuilt without graphs
    (one warning); an explicit cuda_graphs=True is not second-guessed here (the operator raises)."""
    import spectra

    def refuse(self):
        raise ValueError("compile/graphs pad batches to static shapes, which is exact only for ...")

    monkeypatch.setattr(spectra.HessianOperator, "check_static_shapes", refuse)
    opts = DataOptions(root=str(env["root"]), device="cpu", batch_size=4)
    eager = analyse_checkpoint(env["run"][-1], "3", dataclasses.replace(FAST, cuda_graphs=False), opts)
    assert FAST.cuda_graphs is None
    with pytest.warns(RuntimeWarning, match="CUDA graphs off: compile/graphs pad"):
        default = analyse_checkpoint(env["run"][-1], "3", FAST, opts)
    assert default[0].provenance["cuda_graphs"] is False
    np.testing.assert_allclose(default[0].arrays["top"], eager[0].arrays["top"], rtol=1e-12)


@pytest.mark.parametrize("settings, on_gpu", [
    (dict(), True), (dict(hvp_method="forward-over-reverse"), True), (dict(hvp_method="double-backward"), False),
    (dict(keep_graph=True), False), (dict(keep_graph=False), True), (dict(cuda_graphs=False), False),
    (dict(cuda_graphs=True), True)])
def test_cuda_graphs_default_on_for_gpu_products_that_allow_them(settings, on_gpu):
    """cuda_graphs=None (the CLI default): graphs on CUDA unless the products are double-backward
    (--hvp double-backward, --keep-graph); never on the CPU; an explicit choice wins."""
    from spectra.analysis import uses_cuda_graphs

    s = AnalysisSettings(**settings)
    assert uses_cuda_graphs(s, torch.device("cuda", 0)) is on_gpu
    assert uses_cuda_graphs(s, torch.device("cpu")) is False


@pytest.mark.parametrize("fields, pattern", [
    ({"tol": 0.0}, "tol"), ({"tol": -1.0}, "tol"), ({"tol": float("nan")}, "tol"), ({"tol": 1.0}, "tol"),
    ({"probes": 0}, "probes"), ({"steps": 0}, "steps"), ({"max_iter": 0}, "max_iter"),
    ({"max_iter": 1}, "max_iter 1 is fewer than the 2 eigenvalues"), ({"top_k": 1.5}, "top_k"),
    ({"sigma": float("nan")}, "sigma"), ({"sigma": 0.0}, "sigma"), ({"sigma": -1.0}, "sigma"),
    ({"kind": "trace", "trace_probes": 3}, "hutch\\+\\+ needs at least 4 probes"),
    ({"trace_method": "exact"}, "trace method"),
])
def test_settings_refuse_what_the_cli_refuses(fields, pattern):
    """They were accepted and failed later, in every job of a sweep (or ran to max_iter on a NaN tol)."""
    with pytest.raises(AnalysisError, match=pattern) as info:
        AnalysisSettings(**fields)
    assert "\n" not in str(info.value)


def test_valid_settings_for_one_kind_need_not_suit_another():
    """max_iter 1 is fine for a density; asking the same settings for eigs is refused."""
    density = AnalysisSettings(kind="density", max_iter=1)
    with pytest.raises(AnalysisError, match="max_iter 1"):
        density.with_kind("eigs")
