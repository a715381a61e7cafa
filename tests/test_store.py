"""Results store: schema attributes, atomic entries, writer lock, damage handling."""
from __future__ import annotations

import json
import multiprocessing as mp
import os

import h5py
import numpy as np
import pytest

from spectra import results_query, store
from spectra.store import ResultsWriter, StoreError, StoreLockedError
from store_records import make_record


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


def test_rewrite_same_key_replaces_and_reopen_sees_keys(tmp_path):
    path = tmp_path / "r.h5"
    with ResultsWriter(path) as w:
        key = w.write(make_record(1, 0, 1.0, -1.0))
        w.write(make_record(1, 0, 7.0, -1.0))
    with ResultsWriter(path) as w:
        assert w.has(key)
    assert len(store.read_results(path)) == 1
    assert results_query.eigen_table(path)[0].lambda_max[0] == 7.0


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
    with pytest.warns(store.StoreWarning) as caught:
        provenances = store.read_provenances(path)
    # attributes only: the entry whose data chunk is corrupt is listed, the broken ones are not
    corrupt = [name for name in damaged if "_density_" in name]
    assert sorted(store.ResultRecord(provenance=p).key for p in provenances) == sorted(good + corrupt)
    assert len(caught) == len(damaged) - 1
    with pytest.warns(store.StoreWarning):
        table = results_query.eigen_table(path)
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
