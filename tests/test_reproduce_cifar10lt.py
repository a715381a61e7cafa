"""benchmarks/reproduce_cifar10lt.py: the watchdog of in-process runs and the finished-run test."""
import json
import sys
import time

import pytest

from benchmark_scripts import load_script


@pytest.fixture(scope="module")
def table():
    return load_script("reproduce_cifar10lt")


def test_watch_relays_output_and_returns_when_the_child_ends(table, capsys):
    table.watch([sys.executable, "-c", "print('epoch 1'); print('epoch 2')"], stall_s=30)
    assert capsys.readouterr().out == "epoch 1\nepoch 2\n"


def test_watch_kills_a_child_that_goes_silent(table):
    t0 = time.time()
    with pytest.raises(RuntimeError, match="no progress for 1 s"):
        table.watch([sys.executable, "-c", "import time; print('epoch 1', flush=True); time.sleep(60)"], stall_s=1)
    assert time.time() - t0 < 20


def test_watch_reports_a_failed_child(table):
    with pytest.raises(RuntimeError, match="exited with code 3"):
        table.watch([sys.executable, "-c", "raise SystemExit(3)"], stall_s=30)


def test_a_run_stopped_by_its_time_limit_is_not_finished(table, tmp_path):
    def run(name, **summary):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
        return tmp_path / name

    assert table.finished(run("done", epochs_completed=200, stopped_early=False), 200)
    assert not table.finished(run("cut", epochs_completed=140, stopped_early=True), 200)
    assert not table.finished(run("short", epochs_completed=100, stopped_early=False), 200)
    assert not table.finished(tmp_path / "missing", 200)


def test_existing_run_files_are_refused_without_resume(table, tmp_path):
    import argparse

    (tmp_path / "ce").mkdir()
    (tmp_path / "ce" / "metrics.jsonl").write_text("{}\n")  # a run killed before its first checkpoint
    args = argparse.Namespace(out=str(tmp_path), resume=False)
    with pytest.raises(SystemExit, match=r"ce already holds a run \(metrics.jsonl\)"):
        table.refuse_existing_runs(["vs", "ce"], args)
    table.refuse_existing_runs(["vs"], args)
    table.refuse_existing_runs(["ce"], argparse.Namespace(out=str(tmp_path), resume=True))
