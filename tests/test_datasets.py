"""Long-tailed CIFAR construction, the CIFAR pickle reader, data set specs."""
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "train"))
from cifar_format_fixture import write_cifar10, write_cifar100  # noqa: E402

from spectra import datasets as ds  # noqa: E402
from spectra.datasets import (  # noqa: E402
    CIFAR_MEAN, CIFAR_STD, DatasetSpec, default_data_root, download_cifar, load_dataset,
    load_user_dataset, lt_class_counts, lt_indices, normalize, read_cifar,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def test_lt_counts_reference():
    assert lt_class_counts(10, 5000, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(lt_class_counts(10, 5000, 100)) == 12406
    c100 = lt_class_counts(100, 500, 100)
    assert (c100[0], c100[-1], sum(c100)) == (500, 5, 10847)
    assert lt_class_counts(10, 5000, 1) == [5000] * 10
    assert lt_class_counts(10, 5000, 10, "step") == [5000] * 5 + [500] * 5
    assert lt_class_counts(10, 5000, 50)[-1] == 100
    with pytest.raises(ValueError):
        lt_class_counts(10, 5000, 100, "linear")


def test_lt_indices_reference_construction():
    rng = np.random.default_rng(1)
    labels = rng.permutation(np.repeat(np.arange(4), 30))
    counts = [30, 12, 5, 2]
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    idx = lt_indices(labels, counts, seed=0)
    assert np.array_equal(np.random.get_state()[1], before)  # global numpy state untouched
    # reference: seed once, then per class shuffle np.where(labels == c) and keep the first n_c
    np.random.seed(0)
    expected = []
    for c, n in enumerate(counts):
        where = np.where(labels == c)[0]
        np.random.shuffle(where)
        expected.extend(where[:n])
    assert idx.tolist() == expected
    assert np.bincount(labels[idx]).tolist() == counts
    assert not np.array_equal(lt_indices(labels, counts, seed=1), idx)


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_read_cifar10_both_key_types_and_root_forms(tmp_path, bytes_keys):
    folder = write_cifar10(tmp_path, train_per_class=3, test_per_class=2, bytes_keys=bytes_keys)
    images, labels, names = read_cifar(tmp_path, "cifar10", "train")
    assert images.shape == (30, 32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert names[0] == "airplane" and np.bincount(labels).tolist() == [3] * 10
    same, _, _ = read_cifar(folder, "cifar10", "train")  # the batches folder itself
    assert np.array_equal(images, same)
    test_images, test_labels, _ = read_cifar(tmp_path, "cifar10", "test")
    assert test_images.shape == (20, 32, 32, 3)


def test_pixel_layout_is_rgb_planes(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(tmp_path, train_per_class=1, test_per_class=1)
    import pickle

    row = np.zeros(3072, np.uint8)
    row[:1024] = 10  # red plane
    row[1024 + 33] = 200  # green, pixel (1, 1)
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as fh:
            pickle.dump({"data": row[None].repeat(2, 0), "labels": [0, 1]}, fh)
    images, _, _ = read_cifar(tmp_path, "cifar10", "train")
    assert images[0, 0, 0].tolist() == [10, 0, 0] and images[0, 1, 1].tolist() == [10, 200, 0]


def test_read_cifar100(tmp_path):
    write_cifar100(tmp_path, train_per_class=2, test_per_class=1, bytes_keys=True)
    images, labels, names = read_cifar(tmp_path, "cifar100", "train")
    assert images.shape == (200, 32, 32, 3) and len(names) == 100 and names[7] == "class07"


def test_missing_files_error_is_helpful(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        read_cifar(tmp_path, "cifar10", "train")
    msg = str(info.value)
    assert "--data-root" in msg and "SPECTRA_DATA_ROOT" in msg and "--download" in msg and "\n" not in msg


def _rewrite_batch(path, kind):
    """Damage a CIFAR batch file the ways a user's copy can be damaged."""
    import pickle

    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:500])
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    elif kind == "foreign dict":
        path.write_bytes(pickle.dumps({"foo": 1}))
    elif kind == "not a dict":
        path.write_bytes(pickle.dumps([1, 2, 3]))
    elif kind == "short rows":
        path.write_bytes(pickle.dumps({"data": np.zeros((2, 3000), np.uint8), "labels": [0, 1]}))
    elif kind == "label count":
        path.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}))


@pytest.mark.parametrize("kind", ["truncated", "garbage", "foreign dict", "not a dict", "short rows", "label count"])
def test_a_damaged_batch_file_is_a_value_error_naming_it(tmp_path, kind):
    folder = write_cifar10(tmp_path, train_per_class=2, test_per_class=1)
    _rewrite_batch(folder / "data_batch_5", kind)
    with pytest.raises(ValueError) as err:
        read_cifar(tmp_path, "cifar10", "train")
    message = str(err.value)
    assert message.startswith(f"{folder / 'data_batch_5'} is not a CIFAR batch file (") and "\n" not in message


def test_a_damaged_meta_file_is_a_value_error_naming_it(tmp_path):
    folder = write_cifar10(tmp_path, train_per_class=2, test_per_class=1)
    _rewrite_batch(folder / "batches.meta", "foreign dict")
    with pytest.raises(ValueError, match="batches.meta is not a CIFAR batch file .no 'label_names' entry"):
        read_cifar(tmp_path, "cifar10", "test")


@pytest.mark.parametrize("n_max", [1, 12, 49, 500, 5000])
def test_largest_imbalance_ratio_is_the_last_that_keeps_every_class(n_max):
    largest = ds.largest_imbalance_ratio(n_max)
    above = np.nextafter(largest, np.inf)
    for profile in ("exp", "step"):
        assert min(lt_class_counts(10, n_max, largest, profile)) == 1
        assert min(lt_class_counts(10, n_max, above, profile)) == 0
    assert ds.largest_imbalance_ratio(0) == 0.0


def test_load_dataset_every_class_refuses_a_ratio_that_empties_a_class(tmp_path):
    write_cifar10(tmp_path, train_per_class=12, test_per_class=1)
    spec = DatasetSpec("cifar10-lt", str(tmp_path), imbalance_ratio=13)
    with pytest.raises(ValueError, match=r"imbalance ratio 13 leaves class 9 of cifar10-lt without training images .*largest allowed is 12$"):
        load_dataset(spec, every_class=True)
    assert load_dataset(spec).class_counts[-1] == 0  # analysis reports the empty class itself
    assert min(load_dataset(DatasetSpec("cifar10-lt", str(tmp_path), imbalance_ratio=12), every_class=True).class_counts) == 1


def test_dataset_spec_round_trip_and_validation():
    spec = DatasetSpec("cifar100-lt", "/data", imbalance_ratio=50)
    assert DatasetSpec.from_dict(spec.to_dict()) == spec
    assert spec.base == "cifar100" and spec.long_tailed and not spec.with_split("test").long_tailed
    import json

    json.dumps(spec.to_dict())
    with pytest.raises(ValueError, match="unknown data set"):
        DatasetSpec("mnist")
    with pytest.raises(ValueError, match="imbalance ratio must be a finite number >= 1, got nan"):
        DatasetSpec("cifar10-lt", imbalance_ratio=float("nan"))
    with pytest.raises(ValueError, match=r"--lt-seed\) must be in \[0, 2\*\*32\), got -1"):
        DatasetSpec("cifar10-lt", seed=-1)


def test_load_dataset_lt_train_and_balanced_test(tmp_path):
    write_cifar10(tmp_path, train_per_class=40, test_per_class=3)
    train = load_dataset(DatasetSpec("cifar10-lt", str(tmp_path), imbalance_ratio=10))
    assert train.class_counts == lt_class_counts(10, 40, 10)
    assert train.images.shape == (sum(train.class_counts), 32, 32, 3) and train.images.dtype == torch.uint8
    raw_images, raw_labels, _ = read_cifar(tmp_path, "cifar10", "train")
    assert torch.equal(train.labels, torch.from_numpy(raw_labels[train.indices.numpy()]))
    assert torch.equal(train.images[5], torch.from_numpy(raw_images[int(train.indices[5])]))
    test = load_dataset(DatasetSpec("cifar10-lt", str(tmp_path), split="test"))
    assert test.class_counts == [3] * 10  # the test split stays balanced
    balanced = load_dataset(DatasetSpec("cifar10", str(tmp_path)))
    assert balanced.class_counts == [40] * 10
    small = load_dataset(DatasetSpec("cifar10-lt", str(tmp_path), imbalance_ratio=10, max_samples=30))
    assert all(n >= 1 for n in small.class_counts) and len(small) <= 30


def test_content_sha256_names_the_pixels_not_the_path(tmp_path):
    """Two copies of the same files hash alike; one changed pixel, another selection
    or another seed's data do not."""
    import hashlib

    for name in ("a", "b"):
        write_cifar10(tmp_path / name, train_per_class=20, test_per_class=3)
    write_cifar10(tmp_path / "other", train_per_class=20, test_per_class=3, seed=1)

    def lt(root, **kw):
        return load_dataset(DatasetSpec("cifar10-lt", str(root), imbalance_ratio=10, **kw))

    a = lt(tmp_path / "a")
    expected = hashlib.sha256(a.images.numpy().tobytes() + a.labels.numpy().astype("<i8").tobytes()).hexdigest()
    assert a.content_sha256() == expected == lt(tmp_path / "b").content_sha256()
    assert lt(tmp_path / "a", max_samples=30).content_sha256() != expected
    assert lt(tmp_path / "other").content_sha256() != expected
    changed = lt(tmp_path / "a")
    changed.images[0, 0, 0, 0] ^= 1
    assert changed.content_sha256() != expected


def test_lt_from_unequal_classes_uses_the_smallest_class(tmp_path):
    """n_max is the smallest class's count: class 0 (which gets n_max) may be short."""
    import pickle

    folder = write_cifar10(tmp_path, train_per_class=20, test_per_class=1)
    batch = folder / "data_batch_1"
    with open(batch, "rb") as f:
        d = pickle.load(f)
    first_zero = d["labels"].index(0)
    keep = [i for i in range(len(d["labels"])) if i != first_zero]  # class 0 loses one image
    with open(batch, "wb") as f:
        pickle.dump({"data": d["data"][keep], "labels": [d["labels"][i] for i in keep]}, f)
    _, labels, _ = read_cifar(tmp_path, "cifar10", "train")
    smallest = int(np.bincount(labels).min())
    assert np.bincount(labels)[0] == smallest < 20
    train = load_dataset(DatasetSpec("cifar10-lt", str(tmp_path), imbalance_ratio=5))
    assert train.class_counts == lt_class_counts(10, smallest, 5)


def test_normalize():
    img = torch.zeros(1, 32, 32, 3, dtype=torch.uint8)
    img[..., 0] = 255
    out = normalize(img)
    assert out.shape == (1, 3, 32, 32) and out.dtype == torch.float32
    assert out[0, 0, 0, 0].item() == pytest.approx((1 - CIFAR_MEAN[0]) / CIFAR_STD[0])
    assert out[0, 2, 5, 5].item() == pytest.approx(-CIFAR_MEAN[2] / CIFAR_STD[2])


def test_default_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECTRA_DATA_ROOT", str(tmp_path))
    assert default_data_root() == tmp_path
    monkeypatch.delenv("SPECTRA_DATA_ROOT")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_data_root() == tmp_path / "cache" / "spectra" / "data"


def test_download_without_internet_is_a_clear_error(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(ds.urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError, match="could not download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"):
        download_cifar("cifar10", tmp_path)
    assert ds.CIFAR_ARCHIVES["cifar100"][1] == "eb9058c3a382ffc7106e4002c42a8d85"


def test_download_checks_md5(monkeypatch, tmp_path):
    import io

    monkeypatch.setattr(ds.urllib.request, "urlopen", lambda *a, **k: io.BytesIO(b"not the archive"))
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        download_cifar("cifar10", tmp_path)


def _pair_factory(n=4):
    return torch.randn(n, 3), torch.arange(n)


def _bad_factory():
    return 42


def test_load_user_dataset():
    mod = __name__
    data = load_user_dataset(f"{mod}:_pair_factory", n=5)
    assert len(data) == 5
    with pytest.raises(ValueError, match="expected 'package.module:function'"):
        load_user_dataset("nocolon")
    with pytest.raises(ValueError, match="cannot import"):
        load_user_dataset("no_such_mod_xyz:f")
    with pytest.raises(ValueError, match="has no attribute"):
        load_user_dataset(f"{mod}:missing")
    with pytest.raises(ValueError, match="expected a torch Dataset"):
        load_user_dataset(f"{mod}:_bad_factory")
    with pytest.raises(ValueError, match=r"the data set factory '.*:_raising_factory' raised KeyError: 'boom'"):
        load_user_dataset(f"{mod}:_raising_factory")


def _raising_factory():
    raise KeyError("boom")


@pytest.mark.skipif(not (SHARED / "train_labels.npy").exists(), reason="needs /work/shared/data/cifar10")
def test_real_cifar10_lt_counts_from_official_label_order():
    labels = np.load(SHARED / "train_labels.npy").astype(np.int64)
    counts = lt_class_counts(10, 5000, 100)
    idx = lt_indices(labels, counts, seed=0)
    assert len(idx) == 12406 and np.bincount(labels[idx]).tolist() == counts
