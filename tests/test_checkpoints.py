"""Checkpoint loading: every supported format, trust handling, and errors."""
from __future__ import annotations

import collections
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from spectra.checkpoints import (
    CheckpointError,
    KeyMismatchError,
    UntrustedCheckpointError,
    epoch_from_filename,
    file_sha256,
    load_checkpoint,
    read_checkpoint_epoch,
    strip_wrapper_prefixes,
)
from spectra.models import build_model


def _same_outputs(a: nn.Module, b: nn.Module) -> bool:
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a.eval(), b.eval()
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=1e-6)


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10)
    # Non-trivial BatchNorm statistics so a lost buffer would change outputs.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def spectra_checkpoint(model: nn.Module, epoch: int = 7) -> dict:
    """The training engineer's self-describing format (weights_only-safe)."""
    return {
        "format": "spectra-checkpoint", "format_version": 1, "arch": "resnet20",
        "arch_kwargs": {"num_classes": 10, "cosine_head": False}, "num_classes": 10,
        "class_names": [f"k{i}" for i in range(10)],
        "dataset": {"name": "cifar10-lt", "root": None, "split": "train", "imbalance_ratio": 100.0,
                    "profile": "exp", "seed": 0, "max_samples": None},
        "class_counts": [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50], "method": "ce-drw-sam",
        "config": {"lr": 0.1}, "epoch": epoch, "state_dict": model.state_dict(),
        "optimizer": {"state": {}, "param_groups": []},
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()},
        "metrics": {"acc": 0.5}, "spectra_version": "0.1.0",
    }


def test_spectra_checkpoint_loads_without_flags(tmp_path, net):
    path = tmp_path / "ckpt_epoch0007.pt"
    torch.save(spectra_checkpoint(net), path)
    ck = load_checkpoint(path)
    assert ck.format == "spectra" and ck.arch == "resnet20" and ck.epoch == 7
    assert ck.num_classes == 10 and ck.class_names[3] == "k3" and ck.class_counts[-1] == 50
    assert ck.dataset["name"] == "cifar10-lt" and ck.method == "ce-drw-sam"
    assert ck.sha256 == file_sha256(path) and len(ck.sha256) == 64
    assert _same_outputs(ck.model, net)
    assert read_checkpoint_epoch(path) == 7


def test_a_tensor_epoch_is_read_the_same_everywhere(tmp_path, net):
    """``read_checkpoint_epoch`` (sweeps) and ``load_checkpoint`` agree on a 0-dim tensor ``epoch``."""
    path = tmp_path / "weights.pt"
    torch.save({"epoch": torch.tensor(12), "arch": "resnet20", "state_dict": net.state_dict()}, path)
    assert read_checkpoint_epoch(path) == 12 == load_checkpoint(path).epoch


def test_reference_code_format_with_module_prefix_and_cosine_head(tmp_path):
    torch.manual_seed(1)
    model = build_model("resnet20", num_classes=100, cosine_head=True).eval()
    wrapped = nn.DataParallel(model)  # keys become module.*
    path = tmp_path / "ckpt.pth.tar"
    torch.save({"epoch": 160, "arch": "resnet20", "state_dict": wrapped.state_dict(),
                "best_acc1": torch.tensor(41.3), "optimizer": torch.optim.SGD(model.parameters(), lr=0.1).state_dict()},
               path)
    ck = load_checkpoint(path)
    assert ck.format == "reference" and ck.epoch == 160
    assert ck.arch_kwargs == {"num_classes": 100, "cosine_head": True}
    assert ck.extra["best_acc1"] == pytest.approx(41.3)
    assert _same_outputs(ck.model, model)


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model_state_dict", "model", "net"])
def test_plain_state_dict_needs_arch(tmp_path, net, wrapper):
    sd = {f"module.{k}": v for k, v in net.state_dict().items()}
    path = tmp_path / "weights_epoch_12.pt"
    torch.save(sd if wrapper is None else {wrapper: sd, "note": "x"}, path)
    with pytest.raises(CheckpointError, match="holds only weights; pass --arch"):
        load_checkpoint(path)
    ck = load_checkpoint(path, arch="resnet20")
    assert ck.format == "state_dict" and ck.epoch == 12
    assert _same_outputs(ck.model, net)


def test_user_architecture_with_kwargs(tmp_path, monkeypatch):
    (tmp_path / "my_arch_mod.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        class Small(nn.Module):
            def __init__(self, width=4, classes=3):
                super().__init__()
                self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, width), nn.ReLU())
                self.head = nn.Linear(width, classes)
            def forward(self, x):
                return self.head(self.body(x))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_arch_mod", None)
    import my_arch_mod

    model = my_arch_mod.Small(width=6, classes=5)
    path = tmp_path / "small.pt"
    torch.save(model.state_dict(), path)
    ck = load_checkpoint(path, arch="my_arch_mod:Small", arch_kwargs={"width": 6, "classes": 5})
    assert ck.epoch == -1 and ck.arch == "my_arch_mod:Small"
    assert _same_outputs(ck.model, model)
    with pytest.raises(KeyMismatchError, match=r"shape mismatches"):
        load_checkpoint(path, arch="my_arch_mod:Small", arch_kwargs={"width": 6, "classes": 4})
    with pytest.raises(CheckpointError, match="cannot build architecture"):
        load_checkpoint(path, arch="my_arch_mod:Small", arch_kwargs={"depth": 3})


def test_key_mismatch_lists_missing_and_unexpected(tmp_path):
    path = tmp_path / "r32.pt"
    torch.save(build_model("resnet32").state_dict(), path)
    with pytest.raises(KeyMismatchError) as info:
        load_checkpoint(path, arch="resnet20")
    err = info.value
    assert err.unexpected and not err.missing
    assert "layer1.3.conv1.weight" in err.unexpected
    assert "unexpected keys (" in str(err) and "\n" not in str(err)
    sd = build_model("resnet20").state_dict()
    del sd["layer3.2.bn2.weight"]
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, path)
    with pytest.raises(KeyMismatchError, match=r"missing keys \(1\): layer3\.2\.bn2\.weight; unexpected keys \(1\): extra\.weight"):
        load_checkpoint(path, arch="resnet20")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive(tmp_path, net):
    path = tmp_path / "scripted_epoch3.pt"
    torch.jit.save(torch.jit.trace(net, torch.randn(2, 3, 32, 32)), str(path))
    ck = load_checkpoint(path)
    # A recognised built-in is rebuilt eagerly (torch.func cannot differentiate scripts).
    assert ck.format == "torchscript" and ck.epoch == 3 and ck.arch == "resnet20"
    assert not isinstance(ck.model, torch.jit.ScriptModule)
    assert _same_outputs(ck.model, net)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_unrecognised_torchscript_stays_scripted(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3)).eval()
    path = tmp_path / "seq.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    ck = load_checkpoint(path)
    assert isinstance(ck.model, torch.jit.ScriptModule) and ck.arch.startswith("torchscript:")
    assert _same_outputs(ck.model, model)


def test_pickled_module_refused_unless_trusted(tmp_path, net):
    path = tmp_path / "whole_model.pt"
    torch.save(net, path)
    with pytest.raises(UntrustedCheckpointError, match="--trust-checkpoint") as info:
        load_checkpoint(path)
    assert "spectra.models.CifarResNet" in str(info.value)
    ck = load_checkpoint(path, trust=True)
    assert ck.format == "pickled-module" and ck.arch == "spectra.models:CifarResNet"
    assert _same_outputs(ck.model, net)


class _Payload:
    """Unpickling this runs os.system-like code: the attack weights_only stops."""

    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['SPECTRA_TEST_MARK'], 'w').write('pwned')",))


def test_malicious_pickle_never_runs_without_trust(tmp_path, monkeypatch):
    mark = tmp_path / "mark.txt"
    monkeypatch.setenv("SPECTRA_TEST_MARK", str(mark))
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Payload()}, path)
    with pytest.raises(UntrustedCheckpointError):
        load_checkpoint(path, arch="resnet20")
    assert not mark.exists()


def test_missing_garbage_and_unknown_arch(tmp_path, net):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(junk, arch="resnet20")
    path = tmp_path / "w.pt"
    torch.save(net.state_dict(), path)
    with pytest.raises(CheckpointError, match="unknown architecture 'vgg99'"):
        load_checkpoint(path, arch="vgg99")
    torch.save({"epoch": 1, "arch": "resnet50", "state_dict": net.state_dict()}, path)
    with pytest.raises(CheckpointError, match="unknown architecture 'resnet50' \\(from the checkpoint"):
        load_checkpoint(path)
    torch.save({"epoch": 1, "optimizer": {}}, path)
    with pytest.raises(CheckpointError, match="no weights found"):
        load_checkpoint(path, arch="resnet20")


@pytest.mark.parametrize("name, epoch", [
    ("ckpt_epoch0010.pt", 10), ("epoch-7.pth", 7), ("model_20.pth", 20), ("ckpt.e15.pt", 15),
    ("resnet32.pt", None), ("last.pt", None), ("ckpt.pth.tar", None),
    ("model.20.pt", 20), ("v1.2.pt", None), ("net-v2.0.pt", None),  # a version number is not an epoch
])
def test_epoch_from_filename(name, epoch):
    assert epoch_from_filename(name) == epoch


def test_strip_prefixes_only_when_all_keys_have_them():
    t = torch.zeros(1)
    assert list(strip_wrapper_prefixes({"module._orig_mod.a": t, "module._orig_mod.b": t})) == ["a", "b"]
    mixed = collections.OrderedDict([("module.a", t), ("b", t)])
    assert list(strip_wrapper_prefixes(mixed)) == ["module.a", "b"]


def test_foreign_files_are_named_in_the_error(tmp_path):
    """Files passed as checkpoints by mistake get a message that says what they are."""
    import h5py

    text = tmp_path / "notes.pt"
    text.write_text("epoch 3: loss 0.1\n")
    with pytest.raises(CheckpointError, match="it is a text file, not a PyTorch checkpoint"):
        load_checkpoint(text, arch="resnet20")
    results = tmp_path / "results.h5"
    with h5py.File(results, "w") as fh:
        fh["x"] = [1.0]
    with pytest.raises(CheckpointError, match="it is an HDF5 file") as err:
        load_checkpoint(results, arch="resnet20")
    assert "weights_only" not in str(err.value)
    legacy = tmp_path / "legacy.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Payload()}, legacy,
               _use_new_zipfile_serialization=False)
    with pytest.raises(UntrustedCheckpointError, match="--trust-checkpoint"):
        load_checkpoint(legacy, arch="resnet20")
