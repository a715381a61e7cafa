"""The demo end to end (reduced setting) and its shipped data sample.

``spectra demo --quick`` trains ResNet-8 with CE+DRW and CE+DRW+SAM on the
sample, sweeps 2 checkpoints × 3 classes and plots; the test reads back what
it wrote: every (run, epoch, class) eigs entry with its provenance, finite
eigenvalues with small measured residuals, the two density entries, valid
PNGs, and checkpoints that reload on their own.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from spectra import store
from spectra.checkpoints import load_checkpoint
from spectra.datasets import read_cifar
from spectra.demo import DEMO_ARCH, METHODS, DemoConfig, DemoError, load_sample, run_demo, sample_path, write_cifar_batches
from spectra_cli.main import main

SAMPLE_COUNTS = [250, 193, 149, 116, 89, 69, 53, 41, 32, 25]  # data/README.md
LOSSLESS = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "lossless_subset.npz"


# --------------------------------------------------------------- the sample
def test_sample_has_the_documented_shape_and_indices() -> None:
    s = load_sample()
    assert sample_path().stat().st_size < 5_000_000
    assert s["x_train"].shape == (1017, 32, 32, 3) and s["x_train"].dtype == np.uint8
    assert s["x_test"].shape == (500, 32, 32, 3) and s["x_test"].dtype == np.uint8
    assert np.bincount(s["y_train"], minlength=10).tolist() == SAMPLE_COUNTS
    assert list(s["class_names"]) == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                      "ship", "truck"]
    assert s["test_indices"].tolist() == list(range(500))
    # class c = its first n_c images among official training images 0-3999, class-major
    for c, n_c in enumerate(SAMPLE_COUNTS):
        idx = s["train_indices"][s["y_train"] == c]
        assert len(idx) == n_c and np.all(np.diff(idx) > 0) and idx.max() < 4000


@pytest.mark.skipif(not LOSSLESS.is_file(), reason="needs ../shared/data/cifar10/lossless_subset.npz")
def test_sample_pixels_are_the_original_images() -> None:
    s = load_sample()
    src = np.load(LOSSLESS)
    y = src["y_train_0_3999"]
    assert np.array_equal(s["x_train"], src["x_train_0_3999"][s["train_indices"]])
    assert np.array_equal(s["y_train"], y[s["train_indices"]])
    assert np.array_equal(s["x_test"], src["x_test_0_999"][:500])
    for c, n_c in enumerate(SAMPLE_COUNTS):  # the FIRST n_c of the class, none skipped
        assert s["train_indices"][s["y_train"] == c].tolist() == np.flatnonzero(y == c)[:n_c].tolist()


def test_sample_written_as_cifar_pickles_reads_back_identically(tmp_path: Path) -> None:
    s = load_sample()
    write_cifar_batches(s, tmp_path)
    images, labels, names = read_cifar(tmp_path, "cifar10", "train")
    assert np.array_equal(images, s["x_train"]) and np.array_equal(labels, s["y_train"])
    images, labels, _ = read_cifar(tmp_path, "cifar10", "test")
    assert np.array_equal(images, s["x_test"]) and np.array_equal(labels, s["y_test"])
    assert names[9] == "truck"


def test_missing_sample_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(DemoError, match="sample"):
        run_demo(tmp_path / "out", DemoConfig.quick(), progress=False, sample=tmp_path / "nope.npz")


def test_bad_settings_are_refused() -> None:
    with pytest.raises(DemoError, match="drw_epoch"):
        DemoConfig.quick().replace(drw_epoch=3)
    with pytest.raises(DemoError, match="sweep_epochs"):
        DemoConfig.quick().replace(sweep_epochs=(7,))
    with pytest.raises(DemoError, match=r"lr_decay_epoch must be in \[1, epochs\); got 3 with 3 epochs"):
        DemoConfig.quick().replace(lr_decay_epoch=3)  # the decay would never happen (training refuses it too)
    with pytest.raises(DemoError, match=r"warmup_epochs must be in \[0, epochs\); got 3 with 3 epochs"):
        DemoConfig.quick().replace(warmup_epochs=3)


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(main, ["demo", "--quick", "--out", str(tmp_path / "file")])
    assert result.exit_code != 0 and "Error:" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["demo", "--quick", "--epochs", "1", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "drw_epoch" in result.output


# ------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    result = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    return out


def _entries(path: Path) -> list[tuple[dict, dict]]:
    """(attributes, datasets) of every committed entry, read with bare h5py."""
    out = []
    with h5py.File(path, "r") as f:
        assert f.attrs["schema"] == "spectra-results"
        for name, g in f["entries"].items():
            assert not name.startswith(".tmp-")
            out.append((dict(g.attrs), {k: g[k][()] for k in g}))
    return out


def test_demo_writes_every_checkpoint_class_entry(quick_demo: Path) -> None:
    config = DemoConfig.quick()
    entries = _entries(quick_demo / "results.h5")
    eigs = [(a, d) for a, d in entries if a["kind"] == "eigs"]
    found = {(a["run"], int(a["epoch"]), int(a["class_index"])) for a, _ in eigs}
    wanted = {(m, e, c) for m in METHODS for e in config.sweep_epochs for c in config.classes}
    assert found == wanted and len(eigs) == len(wanted)
    # the quick run trains on 200 of the images; the Hessians draw on the whole
    # training split the checkpoint records (the sample), per-class capped
    counts = json.loads(eigs[0][0]["class_counts"])
    assert counts == SAMPLE_COUNTS
    for a, d in eigs:
        assert a["complete"] and a["method"] == a["run"]
        assert a["model"] == DEMO_ARCH and json.loads(a["model_kwargs"])["num_classes"] == 10
        assert json.loads(a["dataset"])["name"] == "cifar10" and a["split"] == "train"
        assert a["num_samples"] == min(config.samples_per_class, counts[a["class_index"]])
        assert a["class_name"] == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                   "ship", "truck"][a["class_index"]]
        assert a["num_params"] == 75290 and a["dtype"] == "float32" and a["algorithm"] == "lanczos"
        assert json.loads(a["algorithm_params"])["tol"] == config.tol
        ckpt = Path(a["checkpoint_path"])
        assert ckpt.name == f"ckpt_epoch{a['epoch']:04d}.pt" and ckpt.parent.name == a["run"]
        assert a["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
        assert np.isfinite(a["loss"]) and a["loss"] > 0
        lam_max, lam_min = d["top"][0], d["bottom"][0]
        assert np.isfinite(lam_max) and np.isfinite(lam_min) and lam_max > 0 and lam_min <= lam_max
        for r in (d["top_residuals"][0], d["bottom_residuals"][0]):
            assert np.isfinite(r) and r >= 0
            if a["converged"]:  # measured residual within the stopping rule
                assert r <= config.tol * max(abs(lam_max), abs(lam_min)) * (1 + 1e-6)
    assert sum(bool(a["converged"]) for a, _ in eigs) >= len(eigs) // 2


def test_demo_density_entries_of_the_tail_class(quick_demo: Path) -> None:
    config = DemoConfig.quick()
    dens = [(a, d) for a, d in _entries(quick_demo / "results.h5") if a["kind"] == "density"]
    assert sorted(a["run"] for a, _ in dens) == sorted(METHODS)
    for a, d in dens:
        assert a["class_index"] == 9 and a["epoch"] == max(config.sweep_epochs)
        assert d["nodes"].shape == d["weights"].shape == (config.density_probes, config.density_steps)
        assert np.allclose(d["weights"].sum(axis=1), 1.0, atol=1e-8)
        assert abs(np.trapezoid(d["values"], d["grid"]) - 1.0) < 1e-3


def test_demo_plots_are_valid_images(quick_demo: Path) -> None:
    for name in ("ratio.png", "density.png"):
        with Image.open(quick_demo / name) as im:
            im.verify()
        with Image.open(quick_demo / name) as im:
            assert im.format == "PNG" and im.width > 400 and im.height > 250
            assert len(set(np.asarray(im.convert("L")).ravel().tolist())) > 10  # not blank


def test_demo_checkpoints_reload_and_reproduce_the_stored_loss(quick_demo: Path) -> None:
    entry = next(r for r in store.read_results(quick_demo / "results.h5", kind="eigs")
                 if r.class_index == 9 and r.run == "ce-drw")
    ckpt = load_checkpoint(entry.provenance["checkpoint_path"])
    assert ckpt.format == "spectra" and ckpt.arch == DEMO_ARCH and ckpt.method == "ce-drw"
    assert ckpt.dataset["root"] == str(quick_demo / "data")
    s = load_sample()
    x = torch.from_numpy(s["x_train"][s["y_train"] == 9][: entry.provenance["num_samples"]])
    from spectra.datasets import normalize

    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(ckpt.model.eval()(normalize(x)), torch.full((len(x),), 9))
    assert float(loss) == pytest.approx(float(entry.provenance["loss"]), rel=1e-4)


def test_demo_rerun_reuses_runs_and_entries(quick_demo: Path) -> None:
    before = store.stored_keys(quick_demo / "results.h5")
    stamp = (quick_demo / "runs" / "ce-drw" / "ckpt_epoch0003.pt").stat().st_mtime_ns
    result = run_demo(quick_demo, DemoConfig.quick(), progress=False, log=lambda _: None)
    assert store.stored_keys(result.results) == before
    assert (quick_demo / "runs" / "ce-drw" / "ckpt_epoch0003.pt").stat().st_mtime_ns == stamp
