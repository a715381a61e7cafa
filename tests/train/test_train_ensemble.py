"""Vectorised ensembles (spectra.train.ensemble): each member ends where a
separate ``fit`` ends, writes the same files, and incompatible runs are refused.

Equality is tested on ``smooth_net.SmoothNet`` (tanh instead of ReLU, see
there why), so the comparison isolates the ensemble's arithmetic. ResNet runs are
checked for files and checkpoints.
"""
import dataclasses
import json
import re

import pytest
import torch

from cifar_format_fixture import write_cifar10
from spectra.train import METHODS, fit, fit_ensemble, group_for_ensembles, resolve_config
from spectra.train.ensemble import StackedLoss
from spectra.train.losses import build_loss

TINY = dict(batch_size=32, eval_batch_size=64, progress=False, imbalance_ratio=10.0)
SMOOTH = "smooth_net:SmoothNet"
QUIET = dict(log=lambda m: None)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar10(root, train_per_class=12, test_per_class=4)
    return str(root)


def assert_same_run(together, alone):
    """Weights and buffers to 1e-5 relative (integers exactly); the same metrics keys."""
    a, b = together.model.state_dict(), alone.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            assert (a[k] - b[k]).norm() <= 1e-5 * b[k].norm() + 1e-7, k
        else:
            assert torch.equal(a[k], b[k]), k
    lines = [(r.out_dir / "metrics.jsonl").read_text().splitlines() for r in (together, alone)]
    assert [sorted(json.loads(x)) for x in lines[0]] == [sorted(json.loads(x)) for x in lines[1]]
    assert sorted(together.summary) == sorted(alone.summary)
    assert together.summary["epochs_completed"] == alone.summary["epochs_completed"]
    assert json.loads((together.out_dir / "summary.json").read_text())["final"]["epoch"] == together.summary["epochs_completed"]


@pytest.mark.parametrize("methods, rhos", [
    (["ce", "ce-drw", "vs"], [None, None, None]),  # DRW switches on at epoch 2, inside the run
    (["ce-sam", "ce-drw-sam", "vs-sam"], [0.1, 0.5, 0.3]),
])
def test_members_end_like_separate_runs(methods, rhos, root, tmp_path):
    configs = [resolve_config(m, data_root=root, arch=SMOOTH, epochs=2, drw_epoch=1, **({"rho": r} if r else {}), **TINY)
               for m, r in zip(methods, rhos)]
    together = fit_ensemble(configs, [tmp_path / m for m in methods], **QUIET)
    for i, (c, t) in enumerate(zip(configs, together)):
        # an ensemble computes NCHW (its stacked weights are contiguous): compare with an NCHW run
        assert_same_run(t, fit(dataclasses.replace(c, channels_last=False), tmp_path / f"alone{i}", **QUIET))


def test_stacked_loss_equals_each_members_loss():
    counts = [12, 9, 7, 5, 4, 3, 2, 2, 1, 1]
    fns = [build_loss("ce", counts), build_loss("ldam", counts, max_margin=0.4, scale=20.0), build_loss("vs", counts, gamma=0.2, tau=1.2)]
    fns[0].weight.copy_(torch.linspace(0.5, 2.0, 10))
    stacked = StackedLoss(fns)
    logits, y = torch.randn(3, 16, 10), torch.randint(0, 10, (16,))
    expected = torch.stack([fn(z, y) for fn, z in zip(fns, logits)])
    assert torch.allclose(stacked(logits, y), expected, rtol=1e-6, atol=1e-6)


def test_resnet_member_checkpoints_are_single_runs(root, tmp_path):
    from spectra.checkpoints import load_checkpoint

    base = dict(data_root=root, arch="resnet8", epochs=1, **TINY)
    configs = [resolve_config(m, **base) for m in ("ce", "ce-drw", "vs")]
    together = fit_ensemble(configs, [tmp_path / m for m in ("ce", "ce-drw", "vs")], **QUIET)
    alone = fit(configs[0], tmp_path / "alone", **QUIET)
    path = tmp_path / "ce" / "ckpt_epoch0001.pt"
    size, single = path.stat().st_size, (tmp_path / "alone" / "ckpt_epoch0001.pt").stat().st_size
    assert abs(size - single) < 0.02 * single  # not 3x: each tensor is saved on its own
    loaded = load_checkpoint(path)
    assert loaded.method == "ce" and loaded.epoch == 1 and loaded.arch == "resnet8"
    x = torch.randn(2, 3, 32, 32)
    together[0].model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded.model.eval()(x), together[0].model(x), atol=1e-6)
    raw = torch.load(path, weights_only=True)
    assert raw.keys() == torch.load(tmp_path / "alone" / "ckpt_epoch0001.pt", weights_only=True).keys()
    assert {p.name for p in (tmp_path / "vs").iterdir()} == {p.name for p in (tmp_path / "alone").iterdir()}
    assert together[2].summary["final"]["epoch"] == 1 and alone.summary["epochs_completed"] == 1
    # results own their storage once the ensemble is finished
    assert all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in together[1].model.parameters())


def test_resume_continues_every_member(root, tmp_path):
    base = dict(data_root=root, arch=SMOOTH, epochs=3, drw_epoch=1, save_every=1, **TINY)
    methods = ["ce-sam", "ce-drw-sam"]
    full = fit_ensemble([resolve_config(m, **base) for m in methods], [tmp_path / "full" / m for m in methods], **QUIET)
    first = fit_ensemble([resolve_config(m, time_limit_s=1e-6, **base) for m in methods], [tmp_path / "split" / m for m in methods], **QUIET)
    assert all(r.summary["stopped_early"] and r.summary["epochs_completed"] == 1 for r in first)
    resumed = fit_ensemble([resolve_config(m, **base) for m in methods], [tmp_path / "split" / m for m in methods], resume=True, **QUIET)
    for a, b in zip(full, resumed):
        sa, sb = a.model.state_dict(), b.model.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert [json.loads(x)["epoch"] for x in (b.out_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    # a member that is not at the others' epoch is refused
    fit(resolve_config("vs-sam", time_limit_s=1e-6, **base), tmp_path / "other", **QUIET)  # stops after epoch 1
    with pytest.raises(ValueError, match="different epochs"):
        fit_ensemble([resolve_config(m, **base) for m in ("ce-sam", "vs-sam")], [tmp_path / "split" / "ce-sam", tmp_path / "other"],
                     resume=True, **QUIET)


@pytest.mark.parametrize("second, message", [
    (dict(method="ldam-drw"), "differs from member 0 (ce) in cosine_head: True vs False"),
    (dict(method="ce-sam"), "in optimizer: 'sam' vs 'sgd'"),
    (dict(method="ce", lr=0.2), "in lr: 0.2 vs 0.1"),
    (dict(method="ce", seed=1), "in seed: 1 vs 0"),
    (dict(method="ce-drw-pgd"), "optimizer 'pgd'"),
    (dict(method="ce-drw", last_batch="short"), "last_batch='short'"),
])
def test_mismatched_members_are_refused_in_one_line(second, message, root, tmp_path):
    first = resolve_config("ce", data_root=root, epochs=1, **TINY)
    settings = dict(second)
    other = resolve_config(settings.pop("method"), data_root=root, epochs=1, **{**TINY, **settings})
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        fit_ensemble([first, other], [tmp_path / "a", tmp_path / "b"], **QUIET)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "a").exists()  # refused before anything is written


def test_the_table_forms_four_groups():
    table = ["ce", "ce-sam", "ce-drw", "ce-drw-sam", "ldam-drw", "ldam-drw-sam", "vs", "vs-sam"]
    configs = [resolve_config(m) for m in table]
    groups = [[table[i] for i in g] for g in group_for_ensembles(configs)]
    assert groups == [["ce", "ce-drw", "vs"], ["ce-sam", "ce-drw-sam", "vs-sam"], ["ldam-drw"], ["ldam-drw-sam"]]
    baselines = group_for_ensembles([resolve_config(m) for m in ("ce-drw-pgd", "ce-drw-lpf", "ce-drw")])
    assert baselines == [[0], [1], [2]]  # PGD / LPF are never vectorised
    short = group_for_ensembles([resolve_config(m, last_batch=lb) for m, lb in (("ce", "short"), ("ce-drw", "wrap"), ("vs", "wrap"))])
    assert short == [[0], [1, 2]]
    assert set(table) <= set(METHODS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_ensemble_matches_eager_ensemble(root, tmp_path):
    torch.backends.cudnn.deterministic = True
    base = dict(data_root=root, arch="resnet8", epochs=2, drw_epoch=1, device="cuda", **TINY)
    methods = ["ce-sam", "ce-drw-sam", "vs-sam"]
    runs = {}
    for mode in ("off", "graphs"):
        runs[mode] = fit_ensemble([resolve_config(m, compile=mode, **base) for m in methods],
                                  [tmp_path / mode / m for m in methods], log=print)
    for eager, graph in zip(runs["off"], runs["graphs"]):
        assert graph.summary["compile_mode"] == "graphs"  # capture did not fall back
        a, b = eager.model.state_dict(), graph.model.state_dict()
        for k in a:
            assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-4), k


def test_ensembles_compute_contiguous_and_say_channels_last_is_ignored(root, tmp_path):
    base = dict(data_root=root, arch=SMOOTH, epochs=1, device="cpu", **TINY)
    logs: list[str] = []
    asked = fit_ensemble([resolve_config(m, channels_last=True, **base) for m in ("ce", "vs")],
                         [tmp_path / "nhwc" / m for m in ("ce", "vs")], log=logs.append)
    default = fit_ensemble([resolve_config(m, **base) for m in ("ce", "vs")], [tmp_path / "auto" / m for m in ("ce", "vs")], **QUIET)
    assert any("channels_last is ignored" in line for line in logs)
    for a, b in zip(asked, default):  # the same kernels: bit-identical
        assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())
