"""Results store: schema attributes, atomic entries, writer lock, readers."""
from __future__ import annotations

import json
import multiprocessing as mp
import os

import h5py
import numpy as np
import pytest

from spectra import store
from spectra.store import ResultRecord, ResultsWriter, StoreError, StoreLockedError


def make_record(epoch: int, cls: int, lam_max: float, lam_min: float, *, run: str = "run-a",
                kind: str = "eigs", settings: str = "s" * 64) -> ResultRecord:
    prov = {
        "kind": kind, "settings_hash": settings, "checkpoint_path": f"/x/{run}/ckpt_epoch{epoch:04d}.pt",
        "checkpoint_sha256": f"{epoch:04d}{run}".ljust(64, "0"), "checkpoint_format": "spectra",
        "epoch": epoch, "run": run, "method": "ce", "model": "resnet20",
        "model_kwargs": {"num_classes": 3, "cosine_head": False}, "dataset": {"name": "cifar10"},
        "split": "train", "class_index": cls, "class_name": f"c{cls}", "num_samples": 10 - cls,
        "sample_indices_sha256": "0" * 64, "class_counts": [10, 9, 8], "loss_fn": "ce", "loss": 1.5,
        "algorithm": "lanczos", "algorithm_params": {"k": 1}, "params": None, "num_params": 100,
        "seed": 0, "dtype": "float32", "device": "cpu", "num_matvecs": 12, "wall_time_s": 0.1,
    }
    if kind == "eigs":
        arrays = {"top": np.array([lam_max]), "bottom": np.array([lam_min]),
                  "top_residuals": np.array([1e-7]), "bottom_residuals": np.array([2e-7])}
    else:
        grid = np.linspace(lam_min, lam_max, 50)
        arrays = {"nodes": np.ones((2, 3)), "weights": np.full((2, 3), 1 / 3), "grid": grid,
                  "values": np.exp(-grid ** 2)}
    return ResultRecord(provenance=prov, arrays=arrays)


def test_schema_attributes_and_plain_h5py_readback(tmp_path):
    path = tmp_path / "r.h5"
    with ResultsWriter(path) as w:
        key = w.write(make_record(10, 1, 5.0, -0.5))
    with h5py.File(path, "r") as f:
        assert f.attrs["schema"] == "spectra-results"
        assert f.attrs["schema_version"] == store.SCHEMA_VERSION
        doc = json.loads(f.attrs["schema_doc"])
        assert "checkpoint_sha256" in doc["entry_attributes"]
        g = f["entries"][key]
        assert bool(g.attrs["complete"])
        assert g.attrs["epoch"] == 10
        assert json.loads(g.attrs["model_kwargs"]) == {"num_classes": 3, "cosine_head": False}
        np.testing.assert_allclose(g["top"][()], [5.0])
        np.testing.assert_allclose(g["bottom"][()], [-0.5])


def test_eigen_table_groups_classes_over_epochs(tmp_path):
    path = tmp_path / "r.h5"
    with ResultsWriter(path) as w:
        for epoch in (30, 10, 20):
            for cls in (0, 1):
                w.write(make_record(epoch, cls, 10.0 + epoch + cls, -float(cls * epoch)))
    table = store.eigen_table(path)
    assert sorted(table) == [0, 1]
    epochs, lmax, lmin = table[1]
    np.testing.assert_array_equal(epochs, [10, 20, 30])
    np.testing.assert_allclose(lmax, [21.0, 31.0, 41.0])
    np.testing.assert_allclose(lmin, [-10.0, -20.0, -30.0])
    assert store.class_names(path) == {0: "c0", 1: "c1"}


def test_several_runs_must_be_chosen(tmp_path):
    path = tmp_path / "r.h5"
    with ResultsWriter(path) as w:
        w.write(make_record(1, 0, 1.0, -1.0, run="drw"))
        w.write(make_record(1, 0, 2.0, -0.1, run="drw-sam"))
    assert store.runs(path) == ["drw", "drw-sam"]
    with pytest.raises(ValueError, match="several runs"):
        store.eigen_table(path)
    assert store.eigen_table(path, run="drw-sam")[0].lambda_max[0] == 2.0


def test_density_record_and_kind_filter(tmp_path):
    path = tmp_path / "r.h5"
    with ResultsWriter(path) as w:
        w.write(make_record(5, 2, 3.0, -1.0))
        w.write(make_record(5, 2, 3.0, -1.0, kind="density"))
    assert len(store.read_results(path)) == 2
    assert [r.kind for r in store.read_results(path, kind="density")] == ["density"]
    rec = store.density_record(path, 2, 5)
    assert rec.arrays["grid"].shape == (50,)
    with pytest.raises(ValueError, match="no density entry"):
        store.density_record(path, 2, 6)


def test_rewrite_same_key_replaces_and_reopen_sees_keys(tmp_path):
    path = tmp_path / "r.h5"
    with ResultsWriter(path) as w:
        key = w.write(make_record(1, 0, 1.0, -1.0))
        w.write(make_record(1, 0, 7.0, -1.0))
    with ResultsWriter(path) as w:
        assert w.has(key)
    assert len(store.read_results(path)) == 1
    assert store.eigen_table(path)[0].lambda_max[0] == 7.0


def test_uncommitted_group_is_ignored_then_cleaned(tmp_path):
    path = tmp_path / "r.h5"
    with ResultsWriter(path) as w:
        w.write(make_record(1, 0, 1.0, -1.0))
    # What a writer killed between create_group and move leaves behind.
    with h5py.File(path, "a") as f:
        g = f["entries"].create_group(".tmp-deadbeef_class0001_eigs_x")
        g.attrs["kind"] = "eigs"
    assert len(store.read_results(path)) == 1
    with ResultsWriter(path):
        pass
    with h5py.File(path, "r") as f:
        assert [n for n in f["entries"] if n.startswith(".tmp-")] == []


def _hold_lock(path, ready, release):
    with ResultsWriter(path):
        ready.set()
        release.wait(20)


def test_second_writer_is_refused_with_pid(tmp_path):
    path = tmp_path / "r.h5"
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(path, ready, release))
    proc.start()
    try:
        assert ready.wait(20)
        with pytest.raises(StoreLockedError, match=rf"being written by another process \(pid {proc.pid}\)"):
            ResultsWriter(path)
    finally:
        release.set()
        proc.join(20)
    with ResultsWriter(path):  # free again once the holder exits
        pass


def test_foreign_and_non_hdf5_files_are_refused(tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(StoreError, match="not a spectra results file"):
        store.read_results(foreign)
    with pytest.raises(StoreError, match="not a spectra results file"):
        ResultsWriter(foreign)
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with pytest.raises(StoreError, match="not an HDF5 file"):
        store.read_results(text)
    with pytest.raises(StoreError, match="not an HDF5 file"):
        ResultsWriter(text)
    assert text.read_text() == "hello"
    with pytest.raises(FileNotFoundError):
        store.read_results(tmp_path / "missing.h5")


def test_unwritable_location(tmp_path):
    with pytest.raises(StoreError, match="cannot write results file"):
        ResultsWriter(tmp_path / "no" / "such" / "dir" / "r.h5")
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(StoreError, match="cannot write results file"):
                ResultsWriter(ro / "r.h5")
        finally:
            ro.chmod(0o700)
