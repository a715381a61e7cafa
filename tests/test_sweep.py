"""Resumable sweeps over checkpoints × classes on tiny checkpoints and data
(tests/tiny_runs.py): expansion of run folders, resuming, failures."""
from __future__ import annotations

import numpy as np
import pytest

from spectra import store
from spectra.analysis import AnalysisSettings
from spectra.class_data import AnalysisError, DataOptions
from spectra.sweep import expand_checkpoints, run_sweep

from tiny_runs import tiny_run


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The tiny 3-checkpoint run of tests/tiny_runs.py, shared by this module's tests."""
    return tiny_run(tmp_path_factory.mktemp("sweep"))


def test_expand_checkpoints_skips_covered_last(env, tmp_path):
    run_dir = env["run"][0].parent
    assert [p.name for p in expand_checkpoints([run_dir])] == [
        "ckpt_epoch0001.pt", "ckpt_epoch0002.pt", "ckpt_epoch0003.pt"]
    other = tmp_path / "partial"
    other.mkdir()
    (other / "ckpt_epoch0001.pt").write_bytes(env["run"][0].read_bytes())
    (other / "last.pt").write_bytes(env["run"][2].read_bytes())  # epoch 3, not covered
    assert [p.name for p in expand_checkpoints([other])] == ["ckpt_epoch0001.pt", "last.pt"]
    with pytest.raises(FileNotFoundError):
        expand_checkpoints([tmp_path / "nothing-here"])


def test_sweep_stores_every_checkpoint_and_class_then_resumes(env, tmp_path):
    out = tmp_path / "results.h5"
    opts = DataOptions(root=str(env["root"]), device="cpu")
    events = []
    summary = run_sweep([env["run"][0].parent], out, classes="0,9", kinds=("eigs", "density"),
                        settings=AnalysisSettings(tol=1e-4, probes=2, steps=8), data_options=opts,
                        progress=events.append)
    assert (summary.computed, summary.skipped, summary.failed) == (12, 0, [])
    assert [e.index for e in events] == list(range(1, 13)) and events[-1].total == 12
    table = store.eigen_table(out)
    np.testing.assert_array_equal(table[9].epochs, [1, 2, 3])
    assert np.all(table[9].lambda_max >= table[9].lambda_min)
    again = run_sweep([env["run"][0].parent], out, classes="0,9", kinds=("eigs", "density"),
                      settings=AnalysisSettings(tol=1e-4, probes=2, steps=8), data_options=opts)
    assert (again.computed, again.skipped) == (0, 12)
    # Different settings are new entries; the data set is not loaded for skips.
    changed = run_sweep([env["run"][0]], out, classes="0", settings=AnalysisSettings(tol=1e-4, seed=1),
                        data_options=opts)
    assert (changed.computed, changed.skipped) == (1, 0)
    assert len(store.read_results(out)) == 13


def test_a_byte_identical_checkpoint_in_another_run_gets_that_run_a_copy(env, tmp_path):
    """Entries are keyed by the file's SHA-256: a run started from a copy of another run's checkpoint
    was skipped and its epoch was missing from that run's series."""
    out = tmp_path / "results.h5"
    twin = tmp_path / "finetune"
    twin.mkdir()
    (twin / "ckpt_epoch0002.pt").write_bytes(env["run"][1].read_bytes())
    (twin / "ckpt_epoch0003.pt").write_bytes(env["run"][2].read_bytes())
    opts = DataOptions(root=str(env["root"]), device="cpu")
    settings = AnalysisSettings(tol=1e-4)
    first = run_sweep([env["run"][1]], out, classes="0", settings=settings, data_options=opts)
    both = run_sweep([twin, env["run"][1]], out, classes="0", settings=settings, data_options=opts)
    assert (first.computed, both.computed, both.skipped) == (1, 1, 2)  # epoch 3 computed once, for the twin
    records = store.read_results(out)
    by_run = {(r.run, r.epoch): r for r in records}
    assert sorted(by_run) == [("finetune", 2), ("finetune", 3), (env["run"][0].parent.name, 2)]
    copy, original = by_run["finetune", 2], by_run[env["run"][0].parent.name, 2]
    assert copy.provenance["alias_of"] == original.key and copy.key == store.alias_key(original.key, str(twin.resolve()))
    assert copy.provenance["checkpoint_path"] == str((twin / "ckpt_epoch0002.pt").resolve())
    np.testing.assert_array_equal(copy.arrays["top"], original.arrays["top"])
    np.testing.assert_array_equal(store.eigen_table(out, "finetune")[0].epochs, [2, 3])
    again = run_sweep([twin, env["run"][0].parent], out, classes="0", settings=settings, data_options=opts)
    assert (again.computed, again.skipped) == (1, 4) and len(store.read_results(out)) == 5  # + epochs 1 and 3 of the run
    assert sum("alias_of" in r.provenance for r in store.read_results(out)) == 2  # epoch 3 of the run copies the twin's


def test_sweep_reports_failures_and_continues(env, tmp_path):
    out = tmp_path / "results.h5"
    opts = DataOptions(dataset="cifar10-lt", root=str(env["root"]), device="cpu")
    summary = run_sweep([env["run"][0]], out, classes="3,9", settings=AnalysisSettings(tol=1e-4), data_options=opts)
    assert summary.computed == 1 and len(summary.failed) == 1 and "has no samples" in summary.failed[0]


def test_one_path_and_one_kind_may_be_given_alone(env, tmp_path):
    """A str was iterated: checkpoints="run/ckpt.pt" scanned "/", kinds="eigs" asked for analysis 'e'."""
    out = tmp_path / "results.h5"
    summary = run_sweep(str(env["run"][0]), out, classes="9", kinds="eigs", settings=AnalysisSettings(tol=1e-4),
                        data_options=DataOptions(root=str(env["root"]), device="cpu"))
    assert (summary.computed, summary.failed) == (1, [])
    (record,) = store.read_results(out)
    assert record.kind == "eigs" and record.provenance["checkpoint_path"] == str(env["run"][0].resolve())


@pytest.mark.parametrize("empty", ["checkpoints", "kinds"])
def test_empty_checkpoints_or_kinds_are_refused_before_the_file_exists(env, tmp_path, empty):
    out = tmp_path / "results.h5"
    arguments = {"checkpoints": [env["run"][0]], "kinds": ["eigs"], empty: []}
    with pytest.raises(AnalysisError, match=f"needs at least one of {empty}"):
        run_sweep(arguments["checkpoints"], out, kinds=arguments["kinds"])
    assert not out.exists()


def test_invalid_settings_fail_before_any_job(env, tmp_path):
    out = tmp_path / "results.h5"
    with pytest.raises(AnalysisError, match="hutch\\+\\+ needs at least 4 probes, got 1"):
        run_sweep([env["run"][0]], out, kinds=("eigs", "trace"), settings=AnalysisSettings(trace_probes=1))
    assert not out.exists()


def test_all_classes_of_another_data_set_are_its_own(env, tmp_path, monkeypatch):
    """--dataset with 3 classes on a 10-class checkpoint: 'all' once meant 10 classes, 7 bogus failures."""
    (tmp_path / "three_classes.py").write_text(
        "import torch\ndef make():\n    return torch.randn(12, 3, 32, 32), torch.arange(12) % 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    summary = run_sweep([env["run"][0]], tmp_path / "r.h5", classes="all",
                        settings=AnalysisSettings(tol=1e-4, params=("linear.bias",)),
                        data_options=DataOptions(dataset="three_classes:make", device="cpu"))
    assert (summary.computed, summary.failed) == (3, [])
