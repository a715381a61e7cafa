"""Queries over results files: runs and their labels, eigen tables, density entries."""
from __future__ import annotations

import numpy as np
import pytest

from spectra import results_query, store
from spectra.store import ResultsWriter
from store_records import make_record


def test_eigen_table_groups_classes_over_epochs(tmp_path):
    path = tmp_path / "r.h5"
    with ResultsWriter(path) as w:
        for epoch in (30, 10, 20):
            for cls in (0, 1):
                w.write(make_record(epoch, cls, 10.0 + epoch + cls, -float(cls * epoch)))
    table = results_query.eigen_table(path)
    assert sorted(table) == [0, 1]
    epochs, lmax, lmin = table[1]
    np.testing.assert_array_equal(epochs, [10, 20, 30])
    np.testing.assert_allclose(lmax, [21.0, 31.0, 41.0])
    np.testing.assert_allclose(lmin, [-10.0, -20.0, -30.0])
    assert results_query.class_names(path) == {0: "c0", 1: "c1"}


def test_several_runs_must_be_chosen(tmp_path):
    path = tmp_path / "r.h5"
    with ResultsWriter(path) as w:
        w.write(make_record(1, 0, 1.0, -1.0, run="drw"))
        w.write(make_record(1, 0, 2.0, -0.1, run="drw-sam"))
    assert results_query.runs(path) == ["drw", "drw-sam"]
    with pytest.raises(ValueError, match="several runs"):
        results_query.eigen_table(path)
    assert results_query.eigen_table(path, run="drw-sam")[0].lambda_max[0] == 2.0


def test_density_record_and_kind_filter(tmp_path):
    path = tmp_path / "r.h5"
    with ResultsWriter(path) as w:
        w.write(make_record(5, 2, 3.0, -1.0))
        w.write(make_record(5, 2, 3.0, -1.0, kind="density"))
    assert len(store.read_results(path)) == 2
    assert [r.kind for r in store.read_results(path, kind="density")] == ["density"]
    rec = results_query.density_record(path, 2, 5)
    assert rec.arrays["grid"].shape == (50,)
    with pytest.raises(ValueError, match="no density entry"):
        results_query.density_record(path, 2, 6)


def test_empty_top_or_bottom_gives_nan_not_index_error(tmp_path):
    path = tmp_path / "r.h5"
    with ResultsWriter(path) as w:
        w.write(make_record(1, 0, 4.0, np.nan))   # stored with bottom-k 0
        w.write(make_record(2, 0, 3.0, -1.0))
        w.write(make_record(1, 1, np.nan, -2.0))  # stored with top-k 0
    table = results_query.eigen_table(path)
    np.testing.assert_array_equal(table[0].epochs, [1, 2])
    np.testing.assert_allclose(table[0].lambda_max, [4.0, 3.0])
    np.testing.assert_allclose(table[0].lambda_min, [np.nan, -1.0])
    np.testing.assert_allclose(table[1].lambda_max, [np.nan])
    np.testing.assert_allclose(table[1].lambda_min, [-2.0])


def test_kind_missing_is_named_in_the_error(tmp_path):
    path = tmp_path / "d.h5"
    with ResultsWriter(path) as w:
        w.write(make_record(3, 2, 3.0, -1.0, kind="density", run="ce-drw"))
    assert results_query.runs(path) == ["ce-drw"] and results_query.runs(path, kind="eigs") == []
    with pytest.raises(ValueError, match=r"holds no eigenvalue \(eigs\) entries"):
        results_query.eigen_table(path, run="ce-drw")
    with pytest.raises(ValueError, match=r"no density entry for class 2 at epoch 4 of run 'ce-drw'"):
        results_query.density_record(path, 2, 4, run="ce-drw")
    with ResultsWriter(path) as w:
        w.write(make_record(3, 2, 3.0, -1.0, run="other"))
    with pytest.raises(ValueError, match=r"run 'ce-drw' has no eigenvalue \(eigs\) entries in .*: other$"):
        results_query.eigen_table(path, run="ce-drw")


def test_same_run_name_in_two_folders_stays_two_runs(tmp_path):
    """seedA/ce-drw and seedB/ce-drw: two experiments, never merged into one series."""
    path = tmp_path / "r.h5"
    with ResultsWriter(path) as w:
        for epoch in (1, 2):
            w.write(make_record(epoch, 0, 10.0, -1.0, run="ce-drw", parent="/exp/seedA"))
            w.write(make_record(epoch, 0, 20.0, -5.0, run="ce-drw", parent="/exp/seedB"))
            w.write(make_record(epoch, 0, 30.0, -3.0, run="ce-drw", kind="density", parent="/exp/seedB"))
        w.write(make_record(1, 0, 5.0, -0.5, run="ce-drw-sam", parent="/exp/seedA"))
    assert results_query.runs(path) == ["ce-drw-sam", "seedA/ce-drw", "seedB/ce-drw"]
    assert results_query.runs(path, kind="density") == ["seedB/ce-drw"]
    assert [(r.name, r.folder) for r in results_query.list_runs(path)][1:] == [
        ("ce-drw", "/exp/seedA/ce-drw"), ("ce-drw", "/exp/seedB/ce-drw")]
    with pytest.raises(ValueError, match=r"several runs \(ce-drw-sam, seedA/ce-drw, seedB/ce-drw\)"):
        results_query.eigen_table(path)
    with pytest.raises(ValueError, match=r"run 'ce-drw' is ambiguous .*: it matches seedA/ce-drw, seedB/ce-drw"):
        results_query.eigen_table(path, run="ce-drw")
    # Label, folder tail, absolute folder and a Run all name the same run; each keeps its own values.
    for spec in ("seedB/ce-drw", "exp/seedB/ce-drw", "/exp/seedB/ce-drw/", results_query.find_run(path, "seedB/ce-drw")):
        np.testing.assert_allclose(results_query.eigen_table(path, run=spec)[0].lambda_max, [20.0, 20.0])
    np.testing.assert_allclose(results_query.eigen_table(path, run="seedA/ce-drw")[0].lambda_min, [-1.0, -1.0])
    assert results_query.find_run(path, "ce-drw-sam").label == "ce-drw-sam"
    with pytest.raises(ValueError, match=r"run 'seedC/ce-drw' not in .*; runs: ce-drw-sam, seedA/ce-drw"):
        results_query.find_run(path, "seedC/ce-drw")
    rec = results_query.density_record(path, 0, 2)  # the only run with density entries needs no --run
    assert results_query.run_of(path, rec).label == "seedB/ce-drw"


def test_run_labels_grow_until_folders_differ(tmp_path):
    path = tmp_path / "r.h5"
    with ResultsWriter(path) as w:
        w.write(make_record(1, 0, 1.0, -1.0, run="ce", parent="/a/s1"))
        w.write(make_record(1, 0, 1.0, -1.0, run="ce", parent="/b/s1"))
    assert results_query.runs(path) == ["a/s1/ce", "b/s1/ce"]



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
    assert results_query.runs(drw) == ["ce-drw"] and results_query.runs(both) == ["ce-drw", "ce-drw-sam"]
    assert results_query.runs(both, kind="density") == ["ce-drw-sam"]
    np.testing.assert_allclose(results_query.eigen_table(both, run="ce-drw-sam")[0].lambda_min, [-2.0])
    np.testing.assert_array_equal(results_query.eigen_table(both, run="ce-drw")[0].epochs, [1, 2])
    assert results_query.density_record(both, 1, 1).run == "ce-drw-sam"  # the only run with densities
    assert len(store.read_results(both)) == 4 and len(store.read_results([drw, str(drw)])) == 2  # a file given twice: once
    with pytest.raises(ValueError, match=r"drw\.h5 \+ .*sam\.h5 holds eigenvalue \(eigs\) entries of several runs"):
        results_query.eigen_table(both)
    # The same name in another folder, in a third file: labelled by folder across the files.
    with ResultsWriter(seed_b) as w:
        w.write(make_record(1, 0, 20.0, -5.0, run="ce-drw", parent="/exp/seedB"))
    assert results_query.runs([drw, seed_b]) == ["seedA/ce-drw", "seedB/ce-drw"]
    np.testing.assert_allclose(results_query.eigen_table([drw, seed_b], run="seedB/ce-drw")[0].lambda_max, [20.0])
    # The same run in two files (a sweep beside the training's own file): one series, newest entry per epoch.
    later = tmp_path / "later.h5"
    with ResultsWriter(later) as w:
        w.write(make_record(2, 0, 12.0, -1.5, run="ce-drw", parent="/exp/seedA", settings="t" * 64))
    series = results_query.eigen_table([later, drw], run="ce-drw")[0]
    np.testing.assert_array_equal(series.epochs, [1, 2])
    np.testing.assert_allclose(series.lambda_max, [10.0, 12.0])
    with pytest.raises(FileNotFoundError, match="results file not found: .*missing"):
        results_query.runs([drw, tmp_path / "missing.h5"])
    with pytest.raises(ValueError, match="no results file given"):
        store.read_results([])

# ------------------------------------------------------------------ damaged files
def test_two_checkpoints_at_one_epoch_of_a_run_are_refused(tmp_path):
    """Plain state dicts have no epoch (-1): two of them in one folder are not a series over epochs."""
    path = tmp_path / "r.h5"
    a, b = make_record(-1, 0, 1.0, -1.0), make_record(-1, 0, 2.0, -2.0)
    b.provenance.update(checkpoint_path="/x/run-a/other.pt", checkpoint_sha256="f" * 64)
    with ResultsWriter(path) as w:
        w.write(a)
        w.write(b)
    with pytest.raises(ValueError, match="different checkpoints at epoch -1"):
        results_query.eigen_table(path)


def test_newest_entry_wins_within_one_second(tmp_path):
    """Two analyses of one checkpoint and class written back to back: creation times carry
    microseconds, so the later one is used whatever order the file lists them in."""
    path = tmp_path / "r.h5"
    with ResultsWriter(path) as w:
        w.write(make_record(1, 0, 1.0, -1.0, settings="b" * 64))
        w.write(make_record(1, 0, 2.0, -1.0, settings="a" * 64))
    times = {r.arrays["top"][0]: r.provenance["created_utc"] for r in store.read_results(path)}
    assert times[2.0] > times[1.0]  # with whole seconds they were equal and the order was the file's
    assert results_query.eigen_table(path)[0].lambda_max[0] == 2.0
