"""Tail and many/medium/few-shot definitions, accuracy summaries, augmentation."""
import pytest
import torch

from spectra.datasets import lt_class_counts
from spectra.train.augment import EpochBatches, crop_and_flip
from spectra.train.evaluation import class_groups, summarize_predictions, tail_classes

C10_LT = lt_class_counts(10, 5000, 100)
C100_LT = lt_class_counts(100, 500, 100)


def test_tail_is_three_rarest_on_cifar10_lt_and_few_shot_on_cifar100_lt():
    assert tail_classes(C10_LT) == [7, 8, 9]
    groups = class_groups(C100_LT)
    assert tail_classes(C100_LT) == groups["few"] and len(groups["few"]) == 30
    assert class_groups(C10_LT)["few"] == []  # no CIFAR-10-LT class has < 20 images


def test_summarize_predictions():
    correct = torch.tensor([90, 80, 70, 60, 50, 40, 30, 20, 10, 0])
    total = torch.full((10,), 100)
    s = summarize_predictions(correct, total, C10_LT)
    assert s["acc"] == 45.0
    assert s["tail_acc"] == 10.0  # mean of 20, 10, 0
    assert s["per_class_acc"][0] == 90.0
    many = [c for c, n in enumerate(C10_LT) if n > 100]
    assert s["many_acc"] == sum(90 - 10 * c for c in many) / len(many)
    assert s["few_acc"] is None


def test_crop_and_flip_matches_slicing():
    g = torch.Generator().manual_seed(0)
    padded = torch.randint(0, 255, (4, 3, 40, 40), generator=g, dtype=torch.uint8)
    idx, dx, dy, flip = torch.tensor([2, 0, 3]), torch.tensor([0, 8, 3]), torch.tensor([8, 0, 5]), torch.tensor([1, 0, 1])
    out = crop_and_flip(padded, idx, dx, dy, flip)
    for k in range(3):
        ref = padded[idx[k], :, dy[k] : dy[k] + 32, dx[k] : dx[k] + 32]
        assert torch.equal(out[k], ref.flip(-1) if flip[k] else ref)


def test_epoch_batches_deterministic_static_and_covering():
    images = torch.randint(0, 255, (50, 32, 32, 3), dtype=torch.uint8)
    labels = torch.arange(50)
    eb = EpochBatches(images, labels, 16, seed=3, device=torch.device("cpu"))
    x1, y1 = eb.epoch(1)
    x1b, y1b = eb.epoch(1)
    x2, _ = eb.epoch(2)
    assert x1.shape == (4, 16, 3, 32, 32) and torch.equal(x1, x1b) and torch.equal(y1, y1b)
    assert not torch.equal(x1, x2)
    assert set(y1.flatten().tolist()) == set(range(50))  # wrap: every image once, 14 repeats
    assert EpochBatches(images, labels, 16, 0, torch.device("cpu"), last_batch="drop").steps == 3
    # short: the reference loader's 16, 16, 16, 2 — the same tensors as wrap, the last batch's first 2 rows used
    short = EpochBatches(images, labels, 16, seed=3, device=torch.device("cpu"), last_batch="short")
    assert (short.steps, short.last_size, short.images_per_epoch) == (4, 2, 50)
    assert [short.batch_size_of(i) for i in range(4)] == [16, 16, 16, 2]
    xs, ys = short.epoch(1)
    assert torch.equal(xs, x1) and sorted(torch.cat([ys[:3].flatten(), ys[3, :2]]).tolist()) == list(range(50))
    assert EpochBatches(images[:48], labels[:48], 16, 0, torch.device("cpu"), last_batch="short").last_size == 16
    assert (eb.last_size, eb.images_per_epoch) == (16, 64)
    # padding is black (0) as RandomCrop(padding=4): a corner crop shows zero rows
    assert eb.padded[:, :, :4].max() == 0


@pytest.mark.parametrize("last_batch", ["wrap", "drop", "short"])
def test_a_batch_larger_than_the_image_set_is_refused(last_batch):
    images = torch.zeros(10, 32, 32, 3, dtype=torch.uint8)
    labels = torch.arange(10)
    with pytest.raises(ValueError, match=r"^the batch size 11 exceeds the 10 training images; use a batch size <= 10$"):
        EpochBatches(images, labels, 11, 0, torch.device("cpu"), last_batch=last_batch)
    assert EpochBatches(images, labels, 10, 0, torch.device("cpu"), last_batch=last_batch).steps == 1
