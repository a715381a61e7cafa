"""Epoch batches with CIFAR augmentation computed on the device in batched ops.

Random crop 32 from the image zero-padded by 4 (pixel value 0, as
``transforms.RandomCrop(32, padding=4)``), then horizontal flip with
probability 1/2. The whole training set lives on the device as uint8; an
epoch is produced by two ``gather`` calls over all images at once — no
per-image Python. The random choices of epoch ``e`` come from a CPU generator
seeded with ``(seed, e)``, so they are identical on every device and a resumed
run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import math

import torch

__all__ = ["EpochBatches", "crop_and_flip", "epoch_generator"]

PAD = 4
SIZE = 32


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for (run seed, 1-indexed epoch, purpose ``stream``)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 7 + stream)


def crop_and_flip(padded: torch.Tensor, index: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Crops ``padded[index][:, :, dy:dy+32, dx:dx+32]``, mirrored where ``flip``.

    ``padded``: (N, C, 40, 40); ``index``, ``dx``, ``dy`` ∈ [0, 8], ``flip`` ∈ {0, 1}: (n,).
    Returns (n, C, 32, 32) of ``padded``'s dtype.
    """
    n, c = index.shape[0], padded.shape[1]
    ar = torch.arange(SIZE, device=padded.device)
    rows = dy[:, None] + ar  # (n, 32)
    cols = dx[:, None] + torch.where(flip[:, None].bool(), SIZE - 1 - ar, ar)
    images = padded[index]  # (n, C, 40, 40)
    images = images.gather(2, rows[:, None, :, None].expand(n, c, SIZE, padded.shape[3]))
    return images.gather(3, cols[:, None, None, :].expand(n, c, SIZE, SIZE))


class EpochBatches:
    """Shuffled, augmented, fixed-size batches of a uint8 NHWC image set.

    ``last_batch="wrap"`` completes the last batch with the first images of the
    same epoch's permutation (``ceil(N/B)`` steps, as the reference loader but
    with static shapes); ``"drop"`` drops the remainder (``floor(N/B)`` steps);
    ``"short"`` is the reference loader exactly: ``ceil(N/B)`` steps, the last
    one only ``last_size = N − (steps−1)·B`` images long. The tensors of an epoch
    are those of ``"wrap"`` (the same draws); a consumer of ``"short"`` uses the
    first ``last_size`` rows of the last batch. A batch larger than the image
    set is refused (``ValueError``) in every mode.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, device: torch.device, last_batch: str = "wrap", augment: bool = True) -> None:
        nchw = images.permute(0, 3, 1, 2).contiguous()
        self.padded = torch.nn.functional.pad(nchw, (PAD, PAD, PAD, PAD)).to(device)
        self.labels = labels.to(device)
        self.n = int(labels.shape[0])
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.augment = augment
        if last_batch not in ("wrap", "drop", "short"):
            raise ValueError(f"last_batch must be 'wrap', 'drop' or 'short', got {last_batch!r}")
        if batch_size > self.n:  # wrap would repeat images within a batch, drop would leave no step
            raise ValueError(f"the batch size {batch_size} exceeds the {self.n} training images; use a batch size <= {self.n}")
        self.steps = self.n // batch_size if last_batch == "drop" else math.ceil(self.n / batch_size)
        full = last_batch != "short" or self.n % batch_size == 0
        self.last_size = batch_size if full else self.n - (self.steps - 1) * batch_size

    def batch_size_of(self, step: int) -> int:
        """Images in (0-indexed) ``step``: ``batch_size``, or ``last_size`` for the last one."""
        return self.last_size if step == self.steps - 1 else self.batch_size

    @property
    def images_per_epoch(self) -> int:
        return (self.steps - 1) * self.batch_size + self.last_size

    def epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images uint8 (S, B, C, 32, 32), labels (S, B))`` for 1-indexed ``epoch``."""
        g = epoch_generator(self.seed, epoch)
        total = self.steps * self.batch_size
        perm = torch.randperm(self.n, generator=g)
        order = perm.repeat(math.ceil(total / self.n))[:total]
        if self.augment:
            dx = torch.randint(0, 2 * PAD + 1, (total,), generator=g)
            dy = torch.randint(0, 2 * PAD + 1, (total,), generator=g)
            flip = torch.randint(0, 2, (total,), generator=g)
        else:
            dx = dy = torch.full((total,), PAD)
            flip = torch.zeros(total, dtype=torch.long)
        order, dx, dy, flip = (t.to(self.device) for t in (order, dx, dy, flip))
        images = crop_and_flip(self.padded, order, dx, dy, flip)
        shape = (self.steps, self.batch_size)
        return images.view(*shape, *images.shape[1:]), self.labels[order].view(shape)
