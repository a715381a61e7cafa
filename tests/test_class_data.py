"""Where a class's samples come from: class names and indices, the data set a
checkpoint records or the user names, the per-class cap, the data identity,
on tiny checkpoints and synthetic CIFAR-10 (tests/tiny_runs.py)."""
from __future__ import annotations

import shutil
import textwrap
import warnings

import pytest
import torch

from spectra.checkpoints import load_checkpoint
from spectra.class_data import AnalysisError, ClassData, DataCache, DataOptions, OtherDataWarning, resolve_classes
from spectra.datasets import CIFAR10_CLASSES, DatasetSpec, load_dataset

from tiny_runs import TINY_ARCH, copy_with_one_pixel_changed, tiny_run


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The tiny 3-checkpoint run of tests/tiny_runs.py, shared by this module's tests."""
    return tiny_run(tmp_path_factory.mktemp("class_data"))


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
    for superscript in ("²", "٣"):  # str.isdigit accepts them; int() fails on '²' and reads '٣' as 3
        with pytest.raises(AnalysisError, match=f"unknown class '{superscript}'"):
            resolve_classes(superscript, names)


@pytest.mark.parametrize("options", [{"max_samples": 0}, {"batch_size": 0}, {"max_samples": 2.5}])
def test_data_options_refuse_what_the_cli_refuses(options):
    """max_samples=0 once failed every job with a misleading 'class has no samples'."""
    with pytest.raises(AnalysisError, match=f"{next(iter(options))} must be a positive integer"):
        DataOptions(**options)


def test_class_without_samples_and_missing_dataset(env, tmp_path):
    checkpoint = load_checkpoint(env["run"][0])
    # Ratio 100 on 6 images per class leaves int(6/100) = 0 images of class 9.
    long_tailed = DataCache(DataOptions(dataset="cifar10-lt", root=str(env["root"])))
    with pytest.raises(AnalysisError, match=r"class 9 \(truck\) has no samples in cifar10-lt \(train split\)"):
        long_tailed.class_data(checkpoint, 9)
    plain = tmp_path / "weights.pt"
    torch.save(checkpoint.model.state_dict(), plain)
    with pytest.raises(AnalysisError, match="does not record its data set; pass --dataset"):
        DataCache(DataOptions()).source(load_checkpoint(plain, TINY_ARCH))


def test_user_dataset_factory(tmp_path, monkeypatch, env):
    (tmp_path / "my_data_mod.py").write_text(textwrap.dedent("""
        import torch
        def make():
            g = torch.Generator().manual_seed(0)
            return torch.randn(12, 3, 32, 32, generator=g), torch.arange(12) % 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    cache = DataCache(DataOptions(dataset="my_data_mod:make"))
    checkpoint = load_checkpoint(env["run"][0])
    data = cache.class_data(checkpoint, 2)
    inputs = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert data.num_samples == 4 and data.targets.tolist() == [2] * 4
    torch.testing.assert_close(data.inputs, inputs[torch.arange(12) % 3 == 2])  # as given: no normalisation
    assert cache.source(checkpoint).description == {"factory": "my_data_mod:make", "split": "train"}
    (tmp_path / "my_empty_mod.py").write_text("import torch\ndef make():\n    return torch.zeros(0, 3), torch.zeros(0)\n")
    with pytest.raises(AnalysisError, match="'my_empty_mod:make' returned no samples"):
        DataCache(DataOptions(dataset="my_empty_mod:make")).source(checkpoint)


@pytest.mark.parametrize("targets, message", [
    ("torch.tensor([0.0, 1.0, 2.7, 1.0])", "non-integer targets \\(e.g. 2.7"),  # was silently class 2
    ("torch.tensor([0, -1, 1, 2])", "negative targets \\(-1\\)"),
    ("torch.tensor([True, False, True, False])", "torch.bool targets"),
])
def test_factory_targets_must_be_class_indices(tmp_path, monkeypatch, env, targets, message):
    module = f"my_labels_mod_{abs(hash(targets))}"  # one module per case: imports are cached
    (tmp_path / f"{module}.py").write_text(f"import torch\ndef make():\n    return torch.zeros(4, 3, 32, 32), {targets}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(AnalysisError, match=message):
        DataCache(DataOptions(dataset=f"{module}:make")).source(load_checkpoint(env["run"][0]))


def test_integral_float_targets_are_classes(tmp_path, monkeypatch, env):
    (tmp_path / "my_float_mod.py").write_text("import torch\ndef make():\n    return torch.zeros(4, 3, 32, 32), torch.tensor([0.0, 1.0, 2.0, 1.0])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    labels = DataCache(DataOptions(dataset="my_float_mod:make")).source(load_checkpoint(env["run"][0])).labels
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 2, 1]


def test_long_tail_options_on_a_balanced_data_set_are_refused(env):
    """--imbalance-ratio / --profile / --lt-seed would be recorded but have no effect on a balanced set."""
    checkpoint = load_checkpoint(env["run"][0])
    cache = DataCache(DataOptions(dataset="cifar10", root=str(env["root"]), imbalance_ratio=50.0, profile="step"))
    with pytest.raises(AnalysisError, match="--imbalance-ratio/--profile only apply to long-tailed data sets"):
        cache.source(checkpoint)


def test_data_identity_names_the_pixels_not_the_root(env, tmp_path):
    """The settings hash covers the identity: a moved copy is the same data, a re-encoded copy
    (here one pixel value changed) is not, though its spec and sample indices are the same."""
    ck = load_checkpoint(env["run"][0])
    a = DataCache(DataOptions(root=str(env["root"]))).identity(ck)
    moved = DataCache(DataOptions(root=str(shutil.copytree(env["root"], tmp_path / "moved")))).identity(ck)
    assert a == moved and a["name"] == "cifar10" and "root" not in a
    assert a["content_sha256"] == load_dataset(DatasetSpec("cifar10", root=str(env["root"]))).content_sha256()
    changed = DataCache(DataOptions(root=str(copy_with_one_pixel_changed(env["root"], tmp_path / "q50")))).identity(ck)
    assert changed != a and {k for k in a if a[k] != changed[k]} == {"content_sha256"}
    capped = DataCache(DataOptions(root=str(env["root"]), max_samples=3)).identity(ck)
    assert capped != a


def test_analysing_other_images_than_the_checkpoint_was_trained_on_warns(env, tmp_path):
    """A checkpoint records the content hash of its training images; the same spec on a changed copy
    (re-encoded, altered) warns once, naming both hashes; a moved copy, the test split of a checkpoint
    without its config and data the user chose (another spec) do not."""
    ck_path = tmp_path / "ckpt_epoch0001.pt"
    content = torch.load(env["run"][0], weights_only=True)
    trained = load_dataset(DatasetSpec("cifar10", root=str(env["root"]))).content_sha256()
    torch.save(dict(content, data_sha256={"train": trained, "test": "0" * 64}), ck_path)
    ck = load_checkpoint(ck_path)
    assert ck.data_sha256 == {"train": trained, "test": "0" * 64}
    changed = str(copy_with_one_pixel_changed(env["root"], tmp_path / "q50"))
    moved = str(shutil.copytree(env["root"], tmp_path / "moved"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for options in (DataOptions(root=moved), DataOptions(root=moved, split="test"),
                        DataOptions(root=changed, split="test"), DataOptions(root=changed, dataset="cifar10-lt")):
            DataCache(options).identity(ck)
    assert caught == []
    cache = DataCache(DataOptions(root=changed))
    with pytest.warns(OtherDataWarning, match=f"train images at {changed} are not those ckpt_epoch0001.pt was trained "
                                              f"on .*≠ recorded {trained[:12]}"):
        cache.identity(ck)
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        cache.class_data(ck, 0)
    assert again == []  # once per data and recorded hash, not per class


def test_analysing_other_test_images_than_the_checkpoint_was_evaluated_on_warns(env, tmp_path):
    """The test split's recorded hash is checked too, when the run's config says its test set was
    whole (max_test_samples None); a capped test set, or no recorded config, is not compared."""
    content = torch.load(env["run"][0], weights_only=True)
    evaluated = load_dataset(DatasetSpec("cifar10", root=str(env["root"]), split="test")).content_sha256()
    hashes = {"train": "0" * 64, "test": evaluated}
    changed = str(copy_with_one_pixel_changed(env["root"], tmp_path / "q50", batch_file="test_batch"))

    def checkpoint(config: dict, name: str):
        path = tmp_path / name
        torch.save(dict(content, data_sha256=hashes, config=config), path)
        return load_checkpoint(path)

    whole = checkpoint({"max_test_samples": None}, "ckpt_epoch0001.pt")
    with pytest.warns(OtherDataWarning, match=f"test images at {changed} are not those ckpt_epoch0001.pt was "
                                              f"evaluated on .*≠ recorded {evaluated[:12]}"):
        DataCache(DataOptions(root=changed, split="test")).identity(whole)
    capped, unknown = checkpoint({"max_test_samples": 5}, "capped.pt"), checkpoint({}, "unknown.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DataCache(DataOptions(root=str(env["root"]), split="test")).identity(whole)  # the images it was evaluated on
        for ck in (capped, unknown):
            DataCache(DataOptions(root=changed, split="test")).identity(ck)
    assert caught == []


def test_factory_identity_hashes_a_tensor_dataset_only(tmp_path, monkeypatch, env):
    """A TensorDataset is hashed like the built-in sets; a generic Dataset would have to be read whole."""
    (tmp_path / "my_id_mod.py").write_text(textwrap.dedent("""
        import torch
        X, Y = torch.zeros(4, 3, 2, 2), torch.tensor([0, 1, 0, 1])
        def tensors():
            return X, Y
        def changed():
            return X + 1, Y
        class Items(torch.utils.data.Dataset):
            def __len__(self):
                return 4
            def __getitem__(self, i):
                return X[i], int(Y[i])
        def items():
            return Items()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    ck = load_checkpoint(env["run"][0])
    ids = {name: DataCache(DataOptions(dataset=f"my_id_mod:{name}")).identity(ck) for name in ("tensors", "changed", "items")}
    assert len(ids["tensors"]["content_sha256"]) == 64
    assert ids["tensors"]["content_sha256"] != ids["changed"]["content_sha256"]
    assert "content_sha256" not in ids["items"] and ids["items"]["factory"] == "my_id_mod:items"


def test_class_data_stays_on_a_gpu_under_half_its_free_memory(monkeypatch):
    data = ClassData(0, "a", inputs=torch.zeros(100), targets=torch.zeros(100, dtype=torch.long), ids_sha256="")
    assert data.fits_on(torch.device("cpu"))
    for free, fits in ((802, True), (801, False)):  # 400 bytes of inputs < free // 2
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 10**9))
        assert data.fits_on(torch.device("cuda")) is fits


def test_the_source_records_the_root_the_data_came_from(env, monkeypatch):
    """$SPECTRA_DATA_ROOT wins over the checkpoint's recorded root (docs/cli.md); the description that
    goes into the results' provenance names that folder, not null."""
    ck = load_checkpoint(env["run"][0])
    monkeypatch.setenv("SPECTRA_DATA_ROOT", str(env["root"]))
    assert DataCache(DataOptions()).source(ck).description["root"] == str(env["root"].resolve())
