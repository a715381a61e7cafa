"""benchmarks/jpeg_reencode.py: a re-encoded CIFAR-10 copy keeps order, labels and shapes; its pixels change."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmark_scripts import BENCHMARKS, load_script
from spectra.datasets import read_cifar

sys.path.insert(0, str(Path(__file__).parent / "train"))
from cifar_format_fixture import write_cifar10  # noqa: E402

pytest.importorskip("PIL")


def test_the_copy_keeps_order_and_labels_and_changes_pixels(tmp_path):
    source = write_cifar10(tmp_path / "src", train_per_class=3, test_per_class=2)
    facts = load_script("jpeg_reencode").reencode(source, 30, tmp_path / "q30")
    for split in ("train", "test"):
        x, y, names = read_cifar(source, "cifar10", split)
        xq, yq, names_q = read_cifar(tmp_path / "q30", "cifar10", split)
        assert np.array_equal(y, yq) and xq.shape == x.shape and xq.dtype == np.uint8 and len(names_q) == 10
        change = np.abs(xq.astype(int) - x.astype(int)).mean()
        assert change > 0 and facts[f"{split}_mean_abs_change"] == pytest.approx(change)
        assert facts[f"{split}_images"] == len(y)


@pytest.mark.parametrize("argv, message", [
    (["--quality", "0"], "--quality must be in 1..95"),
    (["--quality", "50", "--data-root", "/nonexistent/folder"], "nonexistent"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, argv, message):
    base = ["--data-root", str(tmp_path), "--out", str(tmp_path / "out")]
    res = subprocess.run([sys.executable, str(BENCHMARKS / "jpeg_reencode.py"), *base, *argv],
                         capture_output=True, text=True)
    assert res.returncode != 0 and message in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()
