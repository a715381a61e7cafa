"""benchmarks/paper_protocol.py: the paper's augmented operator and Ritz extremes beside spectra's values."""
import json

import numpy as np
import pytest
import torch

from benchmark_scripts import load_script
import spectra
from spectra import datasets as ds
from spectra.class_data import DataCache, DataOptions
from tiny_runs import tiny_run


@pytest.fixture(scope="module")
def protocol():
    return load_script("paper_protocol")


def _all_crops(image: torch.Tensor) -> list[torch.Tensor]:
    """Every normalised 32×32 crop (and its mirror) of one uint8 HWC image zero-padded by 4."""
    padded = torch.nn.functional.pad(image.permute(2, 0, 1), (4, 4, 4, 4))
    crops = []
    for dy in range(9):
        for dx in range(9):
            crop = padded[:, dy:dy + 32, dx:dx + 32]
            crops += [crop, crop.flip(-1)]
    return [ds.normalize(c.permute(1, 2, 0)[None])[0] for c in crops]


def test_every_pass_draws_new_crops_of_the_same_images(protocol):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 32, 32, 3), generator=gen, dtype=torch.uint8)
    labels = torch.arange(10) % 3
    passes = protocol.AugmentedClass(images, labels, 4, torch.Generator().manual_seed(1))
    first, second = list(passes), list(passes)
    assert [len(y) for _, y in first] == [4, 4, 2]
    assert torch.equal(torch.cat([y for _, y in first]), labels)
    x1, x2 = torch.cat([x for x, _ in first]), torch.cat([x for x, _ in second])
    assert not torch.equal(x1, x2)  # the operator changes between products
    for i in (0, 7):  # each input is one of the image's own crops or mirrored crops
        assert any(torch.allclose(x1[i], c) for c in _all_crops(images[i]))
    again = list(protocol.AugmentedClass(images, labels, 4, torch.Generator().manual_seed(1)))
    assert torch.equal(torch.cat([x for x, _ in again]), x1)  # reproducible from its seed


def test_ritz_extremes_of_a_full_run_are_the_extreme_eigenvalues(protocol):
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    sym = a + a.T

    class Dense:
        shape = (8, 8)

        def matmul(self, v):
            return sym @ v

    lmin, lmax = protocol.ritz_extremes(Dense(), 8, seed=0)
    exact = np.linalg.eigvalsh(sym.numpy())
    assert lmin == pytest.approx(exact[0], abs=1e-10) and lmax == pytest.approx(exact[-1], abs=1e-10)
    short_min, short_max = protocol.ritz_extremes(Dense(), 3, seed=0)  # Ritz values lie inside the spectrum
    assert exact[0] - 1e-12 <= short_min and short_max <= exact[-1] + 1e-12


def test_a_checkpoint_gives_exact_fixed_and_augmented_values(protocol, tmp_path, capsys):
    run = tiny_run(tmp_path)
    out = tmp_path / "p.json"
    protocol.main([str(run["run"][-1]), "--classes", "0,3", "--data-root", str(run["root"]), "--steps", "6",
                   "--repeats", "2", "--tol", "1e-6", "--json", str(out)])
    result = json.loads(out.read_text())
    assert [(e["epoch"], e["class"], e["images"]) for e in result["entries"]] == [(3, 0, 6), (3, 3, 6)]
    for entry in result["entries"]:
        exact, fixed = entry["exact"], entry["ritz_fixed"]
        assert exact["residual_max"] <= 1e-6 * abs(exact["lambda_max"]) * 1.01
        # Ritz values of the fixed operator lie inside [λmin, λmax] (float32 products: rounding 1e-6 of λmax).
        slack = 1e-6 * exact["lambda_max"]
        assert exact["lambda_min"] - slack <= fixed["lambda_min"] and fixed["lambda_max"] <= exact["lambda_max"] + slack
        assert [a["seed"] for a in entry["ritz_augmented"]] == [0, 1]
        assert entry["ritz_augmented"][0]["lambda_max"] != entry["ritz_augmented"][1]["lambda_max"]
    assert "Ritz, augmented (seed 1)" in capsys.readouterr().out


def test_no_fixed_check_skips_only_the_fixed_ritz_run(protocol, tmp_path, capsys):
    run = tiny_run(tmp_path)
    out = tmp_path / "p.json"
    protocol.main([str(run["run"][-1]), "--classes", "3", "--data-root", str(run["root"]), "--steps", "6",
                   "--repeats", "1", "--no-fixed-check", "--json", str(out)])
    (entry,) = json.loads(out.read_text())["entries"]
    assert entry["ritz_fixed"] is None and entry["exact"]["lambda_max"] > 0 and len(entry["ritz_augmented"]) == 1
    printed = capsys.readouterr().out
    assert "Ritz, fixed operator" not in printed and "Ritz, augmented (seed 0)" in printed


def test_class_images_are_the_samples_spectra_analyses(protocol, tmp_path):
    run = tiny_run(tmp_path)
    checkpoint = spectra.load_checkpoint(run["run"][-1])
    images, labels = protocol.ClassImages(str(run["root"]), 4)(checkpoint, 3)
    analysed = DataCache(DataOptions(root=str(run["root"]), max_samples=4)).class_data(checkpoint, 3)
    assert images.dtype == torch.uint8 and len(labels) == 4
    assert torch.equal(ds.normalize(images), analysed.inputs) and torch.equal(labels, analysed.targets)
    with pytest.raises(SystemExit, match=r"error: .*class 12 is out of range"):
        protocol.ClassImages(str(run["root"]), 4)(checkpoint, 12)


def test_bad_classes_are_one_line(protocol, tmp_path):
    with pytest.raises(SystemExit, match="--classes must be comma-separated integers"):
        protocol.main([str(tmp_path / "x.pt"), "--classes", "truck", "--data-root", str(tmp_path)])
    with pytest.raises(SystemExit, match="error: .*x.pt"):
        protocol.main([str(tmp_path / "x.pt"), "--classes", "0", "--data-root", str(tmp_path)])
