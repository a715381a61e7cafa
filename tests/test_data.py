"""Class filtering and batching of the supported data forms."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import spectra
from spectra.data import iter_batches, rebatch

X = torch.arange(20.0).reshape(10, 2)
Y = torch.tensor([0, 1, 2, 1, 1, 0, 2, 2, 1, 0])


def test_tensor_pair():
    x, y = spectra.class_subset((X, Y), 1)
    assert y.tolist() == [1, 1, 1, 1] and x[:, 0].tolist() == [2.0, 6.0, 8.0, 16.0]
    x, y = spectra.class_subset((X, Y), [0, 2])
    assert sorted(set(y.tolist())) == [0, 2] and len(y) == 6


def test_dataset_with_and_without_targets_attribute():
    ds = TensorDataset(X, Y)
    sub = spectra.class_subset(ds, 2)
    assert [int(ds[i][1]) for i in sub.indices] == [2, 2, 2]
    ds.targets = Y
    assert spectra.class_subset(ds, 2).indices == sub.indices


def test_loader_and_list_of_batches():
    loader = DataLoader(TensorDataset(X, Y), batch_size=3)
    batches = spectra.class_subset(loader, 0)
    assert [b[1].tolist() for b in batches] == [[0], [0], [0]]
    assert sum(len(b[1]) for b in spectra.class_subset(list(loader), torch.tensor(1))) == 4


def test_missing_class_is_an_error():
    with pytest.raises(ValueError, match=r"no samples of class\(es\) \[7\]"):
        spectra.class_subset((X, Y), 7)
    with pytest.raises(ValueError, match="at least one class"):
        spectra.class_subset((X, Y), [])


def test_batching_helpers():
    batches = spectra.as_batches(X, Y, 4)
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    assert [len(b[1]) for b in rebatch(batches, 3)] == [3, 3, 3, 1]
    assert len(list(iter_batches((X, Y)))) == 1
    assert len(list(iter_batches(TensorDataset(X, Y), 5))) == 2
    with pytest.raises(ValueError, match="differ in length"):
        spectra.as_batches(X, Y[:3])
    with pytest.raises(TypeError, match="batches"):
        list(iter_batches([X]))


def test_a_class_given_as_text_is_one_whole_class():
    """'12' once meant classes [1, 2] (the string was iterated character by character)."""
    y = torch.tensor([0, 1, 2, 12] * 2)
    x = torch.arange(8.0)
    assert spectra.class_subset((x, y), "12")[1].tolist() == [12, 12]
    assert spectra.class_subset((x, y), " 2 ")[1].tolist() == [2, 2]
    named = TensorDataset(X, Y)
    named.classes = ["plane", "car", "bird"]
    assert spectra.class_subset(named, "Car").indices == spectra.class_subset(named, 1).indices
    with pytest.raises(ValueError, match=r"unknown class 'ship'.*classes: plane, car, bird"):
        spectra.class_subset(named, "ship")
    with pytest.raises(ValueError, match=r"unknown class 'car'.*no class names"):
        spectra.class_subset((X, Y), "car")


@pytest.mark.parametrize("bad", [1.7, 1.0, [0, 1.5], True, None, "²"])
def test_non_integer_classes_are_refused_in_one_line(bad):
    with pytest.raises(ValueError) as info:
        spectra.class_subset((X, Y), bad)
    assert "\n" not in str(info.value) and ("integer" in str(info.value) or "unknown class" in str(info.value))
