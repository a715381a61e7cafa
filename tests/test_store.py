"""Results store: schema attributes, atomic entries, writer lock, readers."""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os

import h5py
import numpy as np
import pytest

from spectra import store
from spectra.store import ResultRecord, ResultsWriter, StoreError, StoreLockedError


def make_record(epoch: int, cls: int, lam_max: float, lam_min: float, *, run: str = "run-a",
                kind: str = "eigs", settings: str = "s" * 64, parent: str = "/x") -> ResultRecord:
    """An entry of checkpoint ``{parent}/{run}/ckpt_epoch{epoch}.pt``; NaN λ means an empty end (k = 0)."""
    prov = {
        "kind": kind, "settings_hash": settings, "checkpoint_path": f"{parent}/{run}/ckpt_epoch{epoch:04d}.pt",
        "checkpoint_sha256": hashlib.sha256(f"{parent}/{run}/{epoch}".encode()).hexdigest(), "checkpoint_format": "spectra",
        "epoch": epoch, "run": run, "method": "ce", "model": "resnet20",
        "model_kwargs": {"num_classes": 3, "cosine_head": False}, "dataset": {"name": "cifar10"},
        "split": "train", "class_index": cls, "class_name": f"c{cls}", "num_samples": 10 - cls,
        "sample_indices_sha256": "0" * 64, "class_counts": [10, 9, 8], "loss_fn": "ce", "loss": 1.5,
        "algorithm": "lanczos", "algorithm_params": {"k": 1}, "params": None, "num_params": 100,
        "seed": 0, "dtype": "float32", "device": "cpu", "num_matvecs": 12, "wall_time_s": 0.1,
    }
    if kind == "eigs":
        top = np.array([] if np.isnan(lam_max) else [lam_max])
        bottom = np.array([] if np.isnan(lam_min) else [lam_min])
        arrays = {"top": top, "bottom": bottom,
                  "top_residuals": np.full(top.shape, 1e-7), "bottom_residuals": np.full(bottom.shape, 2e-7)}
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


def test_appending_refreshes_an_older_schema_doc_and_keeps_entries(tmp_path):
    path = tmp_path / "r.h5"
    with ResultsWriter(path) as w:
        first = w.write(make_record(10, 1, 5.0, -0.5))
    old_doc = json.dumps({"schema": "spectra-results", "schema_version": 1, "entry_attributes": {}})
    with h5py.File(path, "a") as f:
        f.attrs["schema_doc"] = old_doc  # as a file made by an earlier spectra
    with ResultsWriter(path) as w:
        second = w.write(make_record(20, 1, 4.0, -0.25))
    with h5py.File(path, "r") as f:
        assert json.loads(f.attrs["schema_doc"]) == store.schema_doc()
        assert set(f["entries"]) == {first, second}
    assert sorted(float(r.arrays["top"][0]) for r in store.read_results(path)) == [4.0, 5.0]


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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.h5", "notes.h5"]  # no .lock left beside them
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


def test_empty_top_or_bottom_gives_nan_not_index_error(tmp_path):
    path = tmp_path / "r.h5"
    with ResultsWriter(path) as w:
        w.write(make_record(1, 0, 4.0, np.nan))   # stored with bottom-k 0
        w.write(make_record(2, 0, 3.0, -1.0))
        w.write(make_record(1, 1, np.nan, -2.0))  # stored with top-k 0
    table = store.eigen_table(path)
    np.testing.assert_array_equal(table[0].epochs, [1, 2])
    np.testing.assert_allclose(table[0].lambda_max, [4.0, 3.0])
    np.testing.assert_allclose(table[0].lambda_min, [np.nan, -1.0])
    np.testing.assert_allclose(table[1].lambda_max, [np.nan])
    np.testing.assert_allclose(table[1].lambda_min, [-2.0])


def test_kind_missing_is_named_in_the_error(tmp_path):
    path = tmp_path / "d.h5"
    with ResultsWriter(path) as w:
        w.write(make_record(3, 2, 3.0, -1.0, kind="density", run="ce-drw"))
    assert store.runs(path) == ["ce-drw"] and store.runs(path, kind="eigs") == []
    with pytest.raises(ValueError, match=r"holds no eigenvalue \(eigs\) entries"):
        store.eigen_table(path, run="ce-drw")
    with pytest.raises(ValueError, match=r"no density entry for class 2 at epoch 4 of run 'ce-drw'"):
        store.density_record(path, 2, 4, run="ce-drw")
    with ResultsWriter(path) as w:
        w.write(make_record(3, 2, 3.0, -1.0, run="other"))
    with pytest.raises(ValueError, match=r"run 'ce-drw' has no eigenvalue \(eigs\) entries in .*: other$"):
        store.eigen_table(path, run="ce-drw")


def test_same_run_name_in_two_folders_stays_two_runs(tmp_path):
    """seedA/ce-drw and seedB/ce-drw: two experiments, never merged into one series."""
    path = tmp_path / "r.h5"
    with ResultsWriter(path) as w:
        for epoch in (1, 2):
            w.write(make_record(epoch, 0, 10.0, -1.0, run="ce-drw", parent="/exp/seedA"))
            w.write(make_record(epoch, 0, 20.0, -5.0, run="ce-drw", parent="/exp/seedB"))
            w.write(make_record(epoch, 0, 30.0, -3.0, run="ce-drw", kind="density", parent="/exp/seedB"))
        w.write(make_record(1, 0, 5.0, -0.5, run="ce-drw-sam", parent="/exp/seedA"))
    assert store.runs(path) == ["ce-drw-sam", "seedA/ce-drw", "seedB/ce-drw"]
    assert store.runs(path, kind="density") == ["seedB/ce-drw"]
    assert [(r.name, r.folder) for r in store.list_runs(path)][1:] == [
        ("ce-drw", "/exp/seedA/ce-drw"), ("ce-drw", "/exp/seedB/ce-drw")]
    with pytest.raises(ValueError, match=r"several runs \(ce-drw-sam, seedA/ce-drw, seedB/ce-drw\)"):
        store.eigen_table(path)
    with pytest.raises(ValueError, match=r"run 'ce-drw' is ambiguous .*: it matches seedA/ce-drw, seedB/ce-drw"):
        store.eigen_table(path, run="ce-drw")
    # Label, folder tail, absolute folder and a Run all name the same run; each keeps its own values.
    for spec in ("seedB/ce-drw", "exp/seedB/ce-drw", "/exp/seedB/ce-drw/", store.find_run(path, "seedB/ce-drw")):
        np.testing.assert_allclose(store.eigen_table(path, run=spec)[0].lambda_max, [20.0, 20.0])
    np.testing.assert_allclose(store.eigen_table(path, run="seedA/ce-drw")[0].lambda_min, [-1.0, -1.0])
    assert store.find_run(path, "ce-drw-sam").label == "ce-drw-sam"
    with pytest.raises(ValueError, match=r"run 'seedC/ce-drw' not in .*; runs: ce-drw-sam, seedA/ce-drw"):
        store.find_run(path, "seedC/ce-drw")
    rec = store.density_record(path, 0, 2)  # the only run with density entries needs no --run
    assert store.run_of(path, rec).label == "seedB/ce-drw"


def test_run_labels_grow_until_folders_differ(tmp_path):
    path = tmp_path / "r.h5"
    with ResultsWriter(path) as w:
        w.write(make_record(1, 0, 1.0, -1.0, run="ce", parent="/a/s1"))
        w.write(make_record(1, 0, 1.0, -1.0, run="ce", parent="/b/s1"))
    assert store.runs(path) == ["a/s1/ce", "b/s1/ce"]



def test_readers_take_several_files_as_one_store(tmp_path):
    """Each run folder's own results.h5 (``--spectra-every``) read together: runs grouped and labelled
    over all files; one (run, epoch, class) in two files appears once, from the newest entry."""
    drw, sam, seed_b = tmp_path / "drw.h5", tmp_path / "sam.h5", tmp_path / "b.h5"
    with ResultsWriter(drw) as w:
        for epoch in (1, 2):
            w.write(make_record(epoch, 0, 10.0, -1.0, run="ce-drw", parent="/exp/seedA"))
    with ResultsWriter(sam) as w:
        w.write(make_record(1, 0, 4.0, -2.0, run="ce-drw-sam", parent="/exp/seedA"))
        w.write(make_record(1, 1, 3.0, -0.3, run="ce-drw-sam", parent="/exp/seedA", kind="density"))
    both = [drw, sam]
    assert store.runs(drw) == ["ce-drw"] and store.runs(both) == ["ce-drw", "ce-drw-sam"]
    assert store.runs(both, kind="density") == ["ce-drw-sam"]
    np.testing.assert_allclose(store.eigen_table(both, run="ce-drw-sam")[0].lambda_min, [-2.0])
    np.testing.assert_array_equal(store.eigen_table(both, run="ce-drw")[0].epochs, [1, 2])
    assert store.density_record(both, 1, 1).run == "ce-drw-sam"  # the only run with densities
    assert len(store.read_results(both)) == 4 and len(store.read_results([drw, str(drw)])) == 2  # a file given twice: once
    with pytest.raises(ValueError, match=r"drw\.h5 \+ .*sam\.h5 holds eigenvalue \(eigs\) entries of several runs"):
        store.eigen_table(both)
    # The same name in another folder, in a third file: labelled by folder across the files.
    with ResultsWriter(seed_b) as w:
        w.write(make_record(1, 0, 20.0, -5.0, run="ce-drw", parent="/exp/seedB"))
    assert store.runs([drw, seed_b]) == ["seedA/ce-drw", "seedB/ce-drw"]
    np.testing.assert_allclose(store.eigen_table([drw, seed_b], run="seedB/ce-drw")[0].lambda_max, [20.0])
    # The same run in two files (a sweep beside the training's own file): one series, newest entry per epoch.
    later = tmp_path / "later.h5"
    with ResultsWriter(later) as w:
        w.write(make_record(2, 0, 12.0, -1.5, run="ce-drw", parent="/exp/seedA", settings="t" * 64))
    series = store.eigen_table([later, drw], run="ce-drw")[0]
    np.testing.assert_array_equal(series.epochs, [1, 2])
    np.testing.assert_allclose(series.lambda_max, [10.0, 12.0])
    with pytest.raises(FileNotFoundError, match="results file not found: .*missing"):
        store.runs([drw, tmp_path / "missing.h5"])
    with pytest.raises(ValueError, match="no results file given"):
        store.read_results([])

# ------------------------------------------------------------------ damaged files
def _corrupt_first_chunk(path, entry: str, dataset: str) -> None:
    """Overwrite the bytes of a compressed dataset's first chunk: its read fails in the gzip filter."""
    with h5py.File(path, "r") as f:
        info = f["entries"][entry][dataset].id.get_chunk_info(0)
    with open(path, "r+b") as raw:
        raw.seek(info.byte_offset)
        raw.write(b"\xff" * info.size)


def damaged_file(path) -> tuple[list[str], list[str]]:
    """A results file with two whole eigs entries and four damaged ones: (intact keys, damaged names)."""
    with ResultsWriter(path) as w:
        good = [w.write(make_record(1, 0, 4.0, -1.0)), w.write(make_record(2, 0, 3.0, -0.5))]
        big = make_record(2, 0, 3.0, -0.5, kind="density")
        big.arrays["values"] = np.linspace(0, 1, 5000)
        corrupt = w.write(big)
    _corrupt_first_chunk(path, corrupt, "values")
    with h5py.File(path, "a") as f:
        entries = f["entries"]
        entries["dangling"] = h5py.SoftLink("/nowhere")
        entries["a_dataset"] = np.arange(3)
        entries.create_group("no_attributes").attrs["complete"] = True
    return good, sorted(["dangling", "a_dataset", "no_attributes", corrupt])


def test_damaged_entries_are_skipped_with_one_warning_each(tmp_path):
    path = tmp_path / "r.h5"
    good, damaged = damaged_file(path)
    with pytest.warns(store.StoreWarning) as caught:
        records = store.read_results(path)
    assert sorted(r.key for r in records) == sorted(good)
    messages = [str(w.message) for w in caught]
    assert len(messages) == len(damaged) and not any("\n" in m for m in messages)
    for name in damaged:
        assert sum(m.startswith(f"{path}: skipping damaged entry {name}: ") for m in messages) == 1
    with pytest.warns(store.StoreWarning):
        table = store.eigen_table(path)
    np.testing.assert_allclose(table[0].lambda_max, [4.0, 3.0])


def test_writers_refuse_a_damaged_file_and_leave_it_unchanged(tmp_path):
    path = tmp_path / "r.h5"
    damaged_file(path)
    before = path.read_bytes()
    with pytest.raises(StoreError, match=rf"^{path} is damaged \(entry \S+: .*\); refusing to write to it$"):
        ResultsWriter(path)
    assert path.read_bytes() == before


def test_file_level_damage_is_one_line(tmp_path):
    as_dataset = tmp_path / "entries_dataset.h5"
    with ResultsWriter(as_dataset):
        pass
    with h5py.File(as_dataset, "a") as f:
        del f["entries"]
        f["entries"] = np.arange(4)
    bad_version = tmp_path / "version.h5"
    with ResultsWriter(bad_version) as w:
        w.write(make_record(1, 0, 4.0, -1.0))
    with h5py.File(bad_version, "a") as f:
        f.attrs["schema_version"] = "one"
    for path, pattern in [(as_dataset, "/entries is a dataset, not a group"),
                          (bad_version, "its schema_version 'one' is not an integer")]:
        for action in (store.read_results, ResultsWriter):
            with pytest.raises(StoreError, match=f"^{path} is damaged: {pattern}$"):
                action(path)


def test_two_checkpoints_at_one_epoch_of_a_run_are_refused(tmp_path):
    """Plain state dicts have no epoch (-1): two of them in one folder are not a series over epochs."""
    path = tmp_path / "r.h5"
    a, b = make_record(-1, 0, 1.0, -1.0), make_record(-1, 0, 2.0, -2.0)
    b.provenance.update(checkpoint_path="/x/run-a/other.pt", checkpoint_sha256="f" * 64)
    with ResultsWriter(path) as w:
        w.write(a)
        w.write(b)
    with pytest.raises(ValueError, match="different checkpoints at epoch -1"):
        store.eigen_table(path)


def test_newest_entry_wins_within_one_second(tmp_path):
    """Two analyses of one checkpoint and class written back to back: creation times carry
    microseconds, so the later one is used whatever order the file lists them in."""
    path = tmp_path / "r.h5"
    with ResultsWriter(path) as w:
        w.write(make_record(1, 0, 1.0, -1.0, settings="b" * 64))
        w.write(make_record(1, 0, 2.0, -1.0, settings="a" * 64))
    times = {r.arrays["top"][0]: r.provenance["created_utc"] for r in store.read_results(path)}
    assert times[2.0] > times[1.0]  # with whole seconds they were equal and the order was the file's
    assert store.eigen_table(path)[0].lambda_max[0] == 2.0
