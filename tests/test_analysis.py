"""Per-class analysis jobs and resumable sweeps on tiny checkpoints and data.

The helpers here (a synthetic CIFAR-10 folder in the standard pickle format, a
tiny importable CNN, spectra-format checkpoints of a short training run) are
also used by tests/test_cli.py.
"""
from __future__ import annotations

import hashlib
import pickle
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from spectra import store
from spectra.analysis import (
    AnalysisError,
    AnalysisSettings,
    DataCache,
    DataOptions,
    LoadOptions,
    analyse_checkpoint,
    expand_checkpoints,
    resolve_classes,
    run_sweep,
)
from spectra.checkpoints import load_checkpoint
from spectra.datasets import CIFAR10_CLASSES, DatasetSpec, load_dataset, normalize

TINY_MODULE = "spectra_test_tiny"
TINY_SOURCE = textwrap.dedent('''
    import torch.nn as nn

    class TinyNet(nn.Module):
        """conv(3→4, stride 2) → BN → ReLU → pool 4×4 → linear: ~800 parameters."""

        def __init__(self, num_classes=10):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.pool = nn.AdaptiveAvgPool2d(4)
            self.linear = nn.Linear(64, num_classes)

        def forward(self, x):
            return self.linear(self.pool(self.bn(self.conv(x)).relu()).flatten(1))
''')
TINY_ARCH = f"{TINY_MODULE}:TinyNet"


def install_tiny_module(folder: Path) -> Path:
    """Write the tiny architecture's module into ``folder`` and make it importable."""
    (folder / f"{TINY_MODULE}.py").write_text(TINY_SOURCE)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return folder


def write_cifar10(root: Path, per_class: int = 6, test_per_class: int = 3, seed: int = 0) -> Path:
    """A synthetic CIFAR-10 in the standard ``cifar-10-batches-py`` pickle format.

    Images of class c are noise around a class-specific colour, so a model can
    learn them. Training labels are interleaved over five batches.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def images(labels: np.ndarray) -> np.ndarray:
        base = (labels[:, None] * 23 % 256).astype(np.float64)
        noise = rng.normal(0, 40, size=(len(labels), 3072))
        channel_shift = np.repeat(np.array([30.0, -20.0, 10.0]), 1024)[None, :] * (labels[:, None] % 3 - 1)
        return np.clip(base + 60 + noise + channel_shift, 0, 255).astype(np.uint8)

    train_labels = np.tile(np.arange(10), per_class)
    rng.shuffle(train_labels)
    data = images(train_labels)
    for i, part in enumerate(np.array_split(np.arange(len(train_labels)), 5), start=1):
        with open(folder / f"data_batch_{i}", "wb") as fh:
            pickle.dump({"data": data[part], "labels": train_labels[part].tolist()}, fh)
    test_labels = np.repeat(np.arange(10), test_per_class)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({"data": images(test_labels), "labels": test_labels.tolist()}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": list(CIFAR10_CLASSES)}, fh)
    return root


def spectra_checkpoint(model: torch.nn.Module, epoch: int, dataset: dict, method: str = "ce") -> dict:
    """A checkpoint in spectra's training format (weights_only-safe)."""
    return {
        "format": "spectra-checkpoint", "format_version": 1, "arch": TINY_ARCH,
        "arch_kwargs": {"num_classes": 10}, "num_classes": 10, "class_names": list(CIFAR10_CLASSES),
        "dataset": dataset, "class_counts": None, "method": method, "config": {}, "epoch": epoch,
        "state_dict": model.state_dict(), "optimizer": {}, "rng": {"torch": torch.get_rng_state()},
        "metrics": {}, "spectra_version": "0.1.0",
    }


def make_run(run_dir: Path, data_root: Path, epochs=(1, 2, 3), dataset: str = "cifar10",
             method: str = "ce", seed: int = 0) -> list[Path]:
    """Train the tiny net for a few epochs, saving ckpt_epoch{E:04d}.pt and last.pt."""
    sys.modules.pop(TINY_MODULE, None)
    tiny = __import__(TINY_MODULE)
    torch.manual_seed(seed)
    model = tiny.TinyNet(10)
    spec = DatasetSpec(dataset, root=str(data_root))
    data = load_dataset(spec)
    x, y = normalize(data.images), data.labels
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for epoch in range(1, max(epochs) + 1):
        model.train()
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        if epoch in epochs:
            ckpt = spectra_checkpoint(model, epoch, spec.to_dict(), method)
            paths.append(run_dir / f"ckpt_epoch{epoch:04d}.pt")
            torch.save(ckpt, paths[-1])
            torch.save(ckpt, run_dir / "last.pt")
    return paths


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A data root, the tiny module and a 3-checkpoint run, shared by this module's tests."""
    base = tmp_path_factory.mktemp("analysis")
    install_tiny_module(base)
    data_root = write_cifar10(base / "data")
    run = make_run(base / "run-ce", data_root)
    return {"base": base, "root": data_root, "run": run}


FAST = AnalysisSettings(kind="eigs", tol=1e-6, dtype="float64", max_iter=120)


def test_class_resolution_by_index_name_list_and_all():
    names = list(CIFAR10_CLASSES)
    assert resolve_classes("all", names) == list(range(10))
    assert resolve_classes("9", names) == [9]
    assert resolve_classes("Truck", names) == [9]
    assert resolve_classes("cat, 0,cat", names) == [3, 0]
    with pytest.raises(AnalysisError, match=r"class 10 is out of range: the data set has 10 classes \(0-9\)"):
        resolve_classes("10", names)
    with pytest.raises(AnalysisError, match="unknown class 'zebra'"):
        resolve_classes("zebra", names)


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


def test_class_without_samples_and_missing_dataset(env, tmp_path):
    # Ratio 100 on 6 images per class leaves int(6/100) = 0 images of class 9.
    opts = DataOptions(dataset="cifar10-lt", root=str(env["root"]), device="cpu")
    with pytest.raises(AnalysisError, match=r"class 9 \(truck\) has no samples in cifar10-lt \(train split\)"):
        analyse_checkpoint(env["run"][0], "9", FAST, opts)
    plain = tmp_path / "weights.pt"
    torch.save(load_checkpoint(env["run"][0]).model.state_dict(), plain)
    with pytest.raises(AnalysisError, match="does not record its data set; pass --dataset"):
        analyse_checkpoint(plain, "0", FAST, DataOptions(device="cpu"), LoadOptions(arch=TINY_ARCH))


def test_non_finite_loss_is_refused(env, tmp_path):
    ck = torch.load(env["run"][0], weights_only=True)
    ck["state_dict"]["linear.bias"][0] = float("nan")
    bad = tmp_path / "ckpt_epoch0001.pt"
    torch.save(ck, bad)
    with pytest.raises(AnalysisError, match="loss is not finite"):
        analyse_checkpoint(bad, "0", FAST, DataOptions(root=str(env["root"]), device="cpu"))


def test_user_dataset_factory(env, tmp_path, monkeypatch):
    (tmp_path / "my_data_mod.py").write_text(textwrap.dedent("""
        import torch
        def make():
            g = torch.Generator().manual_seed(0)
            return torch.randn(12, 3, 32, 32, generator=g), torch.arange(12) % 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    opts = DataOptions(dataset="my_data_mod:make", device="cpu")
    (rec,) = analyse_checkpoint(env["run"][0], "2", FAST, opts)
    assert rec.provenance["num_samples"] == 4 and rec.provenance["dataset"] == {"factory": "my_data_mod:make",
                                                                                  "split": "train"}


def test_expand_checkpoints_skips_covered_last(env, tmp_path):
    run_dir = env["run"][0].parent
    assert [p.name for p in expand_checkpoints([run_dir])] == [
        "ckpt_epoch0001.pt", "ckpt_epoch0002.pt", "ckpt_epoch0003.pt"]
    other = tmp_path / "partial"
    other.mkdir()
    (other / "ckpt_epoch0001.pt").write_bytes(env["run"][0].read_bytes())
    (other / "last.pt").write_bytes(env["run"][2].read_bytes())  # epoch 3, not covered
    assert [p.name for p in expand_checkpoints([other])] == ["ckpt_epoch0001.pt", "last.pt"]
    with pytest.raises(FileNotFoundError):
        expand_checkpoints([tmp_path / "nothing-here"])


def test_sweep_stores_every_checkpoint_and_class_then_resumes(env, tmp_path):
    out = tmp_path / "results.h5"
    opts = DataOptions(root=str(env["root"]), device="cpu")
    events = []
    summary = run_sweep([env["run"][0].parent], out, classes="0,9", kinds=("eigs", "density"),
                        settings=AnalysisSettings(tol=1e-4, probes=2, steps=8), data_options=opts,
                        progress=events.append)
    assert (summary.computed, summary.skipped, summary.failed) == (12, 0, [])
    assert [e.index for e in events] == list(range(1, 13)) and events[-1].total == 12
    table = store.eigen_table(out)
    np.testing.assert_array_equal(table[9].epochs, [1, 2, 3])
    assert np.all(table[9].lambda_max >= table[9].lambda_min)
    again = run_sweep([env["run"][0].parent], out, classes="0,9", kinds=("eigs", "density"),
                      settings=AnalysisSettings(tol=1e-4, probes=2, steps=8), data_options=opts)
    assert (again.computed, again.skipped) == (0, 12)
    # Different settings are new entries; the data set is not loaded for skips.
    changed = run_sweep([env["run"][0]], out, classes="0", settings=AnalysisSettings(tol=1e-4, seed=1),
                        data_options=opts)
    assert (changed.computed, changed.skipped) == (1, 0)
    assert len(store.read_results(out)) == 13


def test_sweep_reports_failures_and_continues(env, tmp_path):
    out = tmp_path / "results.h5"
    opts = DataOptions(dataset="cifar10-lt", root=str(env["root"]), device="cpu")
    summary = run_sweep([env["run"][0]], out, classes="3,9", settings=AnalysisSettings(tol=1e-4), data_options=opts)
    assert summary.computed == 1 and len(summary.failed) == 1 and "has no samples" in summary.failed[0]


def test_data_cache_identity_ignores_root(env):
    ck = load_checkpoint(env["run"][0])
    a = DataCache(DataOptions(root=str(env["root"]))).identity(ck)
    b = DataCache(DataOptions(root="/somewhere/else")).identity(ck)
    assert a == b and a["name"] == "cifar10" and "root" not in a
    c = DataCache(DataOptions(root=str(env["root"]), max_samples=3)).identity(ck)
    assert c != a


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
