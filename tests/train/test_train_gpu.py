"""CUDA-only checks of the optimised training step (skipped without a GPU)."""
import pytest
import torch

from cifar_format_fixture import write_cifar10
from spectra.train import fit, fit_many, resolve_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar10(root, train_per_class=40, test_per_class=10)
    return root


@pytest.mark.parametrize("method, last_batch", [("ce-drw-sam", "wrap"), ("ldam-drw-sam", "wrap"), ("ce-drw-pgd", "wrap"),
                                                ("ce-drw-lpf", "wrap"), ("ce-drw-sam", "short")])
def test_cuda_graph_step_matches_eager(method, last_batch, root, tmp_path):
    """(short: the last batch runs eagerly between graph replays.)"""
    base = dict(data_root=str(root), epochs=2, drw_epoch=1, batch_size=32, imbalance_ratio=10.0, device="cuda", progress=False,
                lpf_samples=2, last_batch=last_batch)
    torch.backends.cudnn.deterministic = True
    eager = fit(resolve_config(method, compile="off", **base), tmp_path / "eager", log=print)
    graph = fit(resolve_config(method, compile="graphs", **base), tmp_path / "graph", log=print)
    assert graph.summary["compile_mode"] == "graphs"  # capture did not fall back
    a, b = eager.model.state_dict(), graph.model.state_dict()
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-4), k
        else:
            assert torch.equal(a[k], b[k]), k


def test_fit_many_on_streams_matches_fit(root, tmp_path):
    base = dict(data_root=str(root), epochs=2, batch_size=32, imbalance_ratio=10.0, device="cuda", progress=False)
    torch.backends.cudnn.deterministic = True
    configs = [resolve_config("ce-drw-sam", **base), resolve_config("vs", **base)]
    many = fit_many(configs, [tmp_path / "a", tmp_path / "b"], log=print)
    for i, (c, r) in enumerate(zip(configs, many)):
        alone = fit(c, tmp_path / f"alone{i}", log=print)
        sa, sb = alone.model.state_dict(), r.model.state_dict()
        assert all(torch.allclose(sa[k].float(), sb[k].float(), rtol=1e-3, atol=1e-4) for k in sa)
