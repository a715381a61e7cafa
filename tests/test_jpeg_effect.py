"""benchmarks/jpeg_effect.py: its data folders read back exactly; the JPEG round trip is lossy but close;
--checkpoints scores a trained model on both test versions."""
import argparse
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmark_scripts import load_script
from spectra.datasets import read_cifar
from spectra.train import fit, resolve_config

sys.path.insert(0, str(Path(__file__).parent / "train"))
from cifar_format_fixture import write_cifar10  # noqa: E402


@pytest.fixture(scope="module")
def jpeg_effect():
    return load_script("jpeg_effect")


def test_written_batches_read_back_pixel_for_pixel(jpeg_effect, tmp_path):
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    test_x = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    train_y, test_y = np.array([0, 1, 2, 3, 4, 5, 9]), np.array([9, 0, 4])
    jpeg_effect.write_batches(tmp_path / "cifar-10-batches-py", train_x, train_y, test_x, test_y)
    x, y, names = read_cifar(tmp_path, "cifar10", "train")
    assert np.array_equal(x, train_x) and np.array_equal(y, train_y) and len(names) == 10
    x, y, _ = read_cifar(tmp_path, "cifar10", "test")
    assert np.array_equal(x, test_x) and np.array_equal(y, test_y)


def test_jpeg_roundtrip_changes_pixels_but_keeps_the_image(jpeg_effect):
    pytest.importorskip("PIL")
    yy, xx = np.mgrid[0:32, 0:32]
    smooth = np.stack([xx * 8, yy * 8, (xx + yy) * 4], axis=-1).astype(np.uint8)[None]
    out = jpeg_effect.jpeg_roundtrip(smooth)
    err = np.abs(out.astype(int) - smooth.astype(int))
    assert out.shape == smooth.shape and out.dtype == np.uint8
    assert 0 < err.mean() < 4


def test_checkpoints_mode_evaluates_on_both_test_versions(jpeg_effect, tmp_path):
    """--checkpoints: a trained checkpoint scored on the original and re-encoded test images."""
    pytest.importorskip("PIL")
    write_cifar10(tmp_path, train_per_class=8, test_per_class=1)
    fit(resolve_config("ce", data_root=str(tmp_path), arch="resnet8", epochs=1, batch_size=16, progress=False,
                       imbalance_ratio=4.0, device="cpu"), tmp_path / "run", log=lambda m: None)
    rng = np.random.default_rng(1)
    labels = np.arange(1000) % 10
    images = np.clip(labels[:, None, None, None] * 20 + rng.integers(0, 60, (1000, 32, 32, 3)), 0, 255).astype(np.uint8)
    np.savez(tmp_path / "lossless.npz", x_test_0_999=images, y_test_0_999=labels.astype(np.uint8))
    args = argparse.Namespace(lossless=str(tmp_path / "lossless.npz"), checkpoints=[str(tmp_path / "run" / "last.pt")])
    result = jpeg_effect.evaluate_checkpoints(args)
    (row,) = result["runs"]
    assert result["test_counts"] == [100] * 10 and row["method"] == "ce" and row["epoch"] == 1
    for kind in ("original", "jpeg"):
        assert 0.0 <= row[f"acc_on_{kind}_test"] <= 100.0
    assert result["mean_original_minus_jpeg"] == row["acc_on_original_test"] - row["acc_on_jpeg_test"]
