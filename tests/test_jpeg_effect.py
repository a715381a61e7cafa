"""benchmarks/jpeg_effect.py: its data folders read back exactly; the JPEG round trip is lossy but close."""
import numpy as np
import pytest

from benchmark_scripts import load_script
from spectra.datasets import read_cifar


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
