"""Resumable sweeps over checkpoints × classes on tiny checkpoints and data
(tests/tiny_runs.py): expansion of run folders, resuming, failures."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from spectra import results_query, store
from spectra.analysis import AnalysisSettings
from spectra.class_data import AnalysisError, DataOptions
from spectra.datasets import DatasetSpec, load_dataset
from spectra.sweep import expand_checkpoints, run_sweep

from tiny_runs import copy_with_one_pixel_changed, tiny_run


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
    table = results_query.eigen_table(out)
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


def _twin_folder(tmp_path, name, *files):
    folder = tmp_path / name
    folder.mkdir()
    for f in files:
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def test_a_byte_identical_checkpoint_in_another_run_gets_that_run_a_copy(env, tmp_path):
    """Entries are keyed by the file's SHA-256: a run started from a copy of another run's checkpoint
    was skipped and its epoch was missing from that run's series."""
    out = tmp_path / "results.h5"
    twin = _twin_folder(tmp_path, "finetune", env["run"][1], env["run"][2])
    opts = DataOptions(root=str(env["root"]), device="cpu")
    settings = AnalysisSettings(tol=1e-4)
    first = run_sweep([env["run"][1]], out, classes="0", settings=settings, data_options=opts)
    both = run_sweep([twin, env["run"][1]], out, classes="0", settings=settings, data_options=opts)
    assert first.computed == 1 and (both.computed, both.skipped, both.copied) == (1, 1, 1)  # epoch 3: once
    records = store.read_results(out)
    by_run = {(r.run, r.epoch): r for r in records}
    assert sorted(by_run) == [("finetune", 2), ("finetune", 3), (env["run"][0].parent.name, 2)]
    copy, original = by_run["finetune", 2], by_run[env["run"][0].parent.name, 2]
    assert copy.provenance["alias_of"] == original.key and copy.key == store.alias_key(original.key, str(twin.resolve()))
    assert copy.provenance["checkpoint_path"] == str((twin / "ckpt_epoch0002.pt").resolve())
    np.testing.assert_array_equal(copy.arrays["top"], original.arrays["top"])
    np.testing.assert_array_equal(results_query.eigen_table(out, "finetune")[0].epochs, [2, 3])
    again = run_sweep([twin, env["run"][0].parent], out, classes="0", settings=settings, data_options=opts)
    assert (again.computed, again.skipped, again.copied) == (1, 3, 1)  # epoch 1 of the run; its epoch 3 copies the twin's
    assert len(store.read_results(out)) == 5 and sum("alias_of" in r.provenance for r in store.read_results(out)) == 2
    from click.testing import CliRunner

    from spectra_cli.main import main

    info = CliRunner().invoke(main, ["info", str(out)], catch_exceptions=False).stdout
    assert [line.split()[0] for line in info.splitlines() if line.rstrip().endswith(" copy")] == ["finetune", "run-ce"]


def test_a_moved_run_folder_is_the_same_run(env, tmp_path):
    """A results file that travels (GPU box → laptop) or a renamed folder: the stored file is gone, so a
    re-sweep of the new place skips its entries and creates no second run."""
    out = tmp_path / "results.h5"
    opts = DataOptions(root=str(env["root"]), device="cpu")
    (tmp_path / "gpu-box").mkdir()
    gpu_box = _twin_folder(tmp_path / "gpu-box", "ce-drw", *env["run"][:2])
    run_sweep([gpu_box], out, classes="0", settings=AnalysisSettings(tol=1e-4), data_options=opts)
    moved = gpu_box.rename(tmp_path / "ce-drw")
    again = run_sweep([moved], out, classes="0", settings=AnalysisSettings(tol=1e-4), data_options=opts)
    assert (again.computed, again.skipped, again.copied) == (0, 2, 0)
    assert [r.label for r in results_query.list_runs(out)] == ["ce-drw"]


def test_a_sweep_on_other_pixels_is_not_taken_as_stored(env, tmp_path):
    """The same checkpoint, class and settings on a copy of the data with one pixel changed (e.g. a
    re-encoded copy): once skipped as stored, reporting the first copy's eigenvalues as the second's."""
    out = tmp_path / "results.h5"
    settings = AnalysisSettings(tol=1e-4)
    roots = {"first": env["root"], "moved": shutil.copytree(env["root"], tmp_path / "moved"),
             "changed": copy_with_one_pixel_changed(env["root"], tmp_path / "changed")}
    counts = {}
    for name, root in roots.items():
        s = run_sweep([env["run"][0]], out, classes="0", settings=settings,
                      data_options=DataOptions(root=str(root), device="cpu"))
        counts[name] = (s.computed, s.skipped, s.failed)
    assert counts == {"first": (1, 0, []), "moved": (0, 1, []), "changed": (1, 0, [])}
    hashes = {r.provenance["data_sha256"] for r in store.read_results(out)}
    assert hashes == {load_dataset(DatasetSpec("cifar10", root=str(root))).content_sha256()
                      for root in (roots["first"], roots["changed"])}
    assert results_query.settings_differences(store.read_results(out)) == ["dataset", "data_sha256"]


def test_twin_results_written_twice_keep_both_runs(env, tmp_path):
    """Both twins computed (torchrun --spread jobs lists both; `spectra eigs TWIN --out`): the second write
    must not take the first run's entry away."""
    out = tmp_path / "results.h5"
    twin = _twin_folder(tmp_path, "twin", env["run"][0])
    opts = DataOptions(root=str(env["root"]), device="cpu")
    run_sweep([env["run"][0]], out, classes="0", settings=AnalysisSettings(tol=1e-4), data_options=opts)
    (original,) = store.read_results(out)
    twin_record = store.ResultRecord(dict(original.provenance, checkpoint_path=str((twin / env["run"][0].name).resolve()),
                                          run="twin"), original.arrays)
    with store.ResultsWriter(out) as w:
        key = w.write(twin_record)
    assert key == store.alias_key(original.key, str(twin.resolve()))
    assert sorted(r.run for r in store.read_results(out)) == sorted([original.run, "twin"])


def test_a_symlinked_checkpoint_belongs_to_the_folder_of_the_link(env, tmp_path):
    out = tmp_path / "results.h5"
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "ckpt_epoch0001.pt").symlink_to(env["run"][0])
    opts = DataOptions(root=str(env["root"]), device="cpu")
    run_sweep([env["run"][0]], out, classes="0", settings=AnalysisSettings(tol=1e-4), data_options=opts)
    summary = run_sweep([linked], out, classes="0", settings=AnalysisSettings(tol=1e-4), data_options=opts)
    assert summary.copied == 1 and "linked" in {r.run for r in store.read_results(out)}


def test_a_copy_that_cannot_be_written_is_a_failure_of_the_sweep(env, tmp_path, monkeypatch):
    out = tmp_path / "results.h5"
    twin = _twin_folder(tmp_path, "twin", env["run"][0])
    opts = DataOptions(root=str(env["root"]), device="cpu")
    run_sweep([env["run"][0]], out, classes="0", settings=AnalysisSettings(tol=1e-4), data_options=opts)
    real_write = store.ResultsWriter.write

    def full_disk(self, record):
        if record.provenance.get("alias_of"):
            raise OSError(28, "No space left on device")
        return real_write(self, record)

    monkeypatch.setattr(store.ResultsWriter, "write", full_disk)
    summary = run_sweep([twin], out, classes="0", settings=AnalysisSettings(tol=1e-4), data_options=opts)
    assert summary.copied == 0 and len(summary.failed) == 1 and "could not copy the stored entry" in summary.failed[0]
    assert len(store.read_results(out)) == 1  # the original entry is intact


def test_a_plain_last_pt_twin_of_a_numbered_checkpoint_comes_after_it(tmp_path):
    """Plain state dicts: last.pt has no epoch (-1); analysed first, it took the epoch's entry for itself."""
    import torch

    folder = tmp_path / "plain"
    folder.mkdir()
    for e in (1, 2):
        torch.save({"w": torch.full((2,), float(e))}, folder / f"ckpt_epoch{e:04d}.pt")
    (folder / "last.pt").write_bytes((folder / "ckpt_epoch0002.pt").read_bytes())
    assert [p.name for p in expand_checkpoints([folder])] == ["ckpt_epoch0001.pt", "ckpt_epoch0002.pt", "last.pt"]


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
