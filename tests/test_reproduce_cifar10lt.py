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


@pytest.mark.parametrize("argv, message", [
    (["--methods", ""], "--methods lists no method"),
    (["--methods", "ce,bogus"], "unknown method(s) bogus"),
    (["--parallel", "0"], "--parallel: must be a finite number > 0"),  # hung before: no run ever started
    (["--max-train-samples", "0"], "--max-train-samples: must be a finite number > 0"),  # was dropped: full data
    (["--time-budget-s", "nan"], "--time-budget-s: must be a finite number > 0"),
    (["--seed", "-1"], "seed must be >= 0"),
    (["--set", "rho=abc"], "rho=abc"),
    (["--methods", "ce", "--save-every-for", "vs=5"], "--save-every-for names vs, not among --methods ce"),
    (["--save-every-for", "ce=0"], "--save-every-for: must be a finite number > 0"),
    (["--save-every-for", "ce"], "--save-every-for: expected METHOD=N"),
    (["--save-every-for", "ce="], "--save-every-for: expected METHOD=N with N a positive integer"),
    (["--methods", "ce,vs", "--save-every-for", "ce=2", "--save-every-for", "ce=3"], "--save-every-for gives ce more than once"),
    (["--methods", "ce-drw,ce-drw-sam,ce-drw"], "--methods lists ce-drw more than once"),  # one folder, two runs
])
def test_bad_arguments_are_refused_before_any_run_starts(table, tmp_path, monkeypatch, capsys, argv, message):
    out = tmp_path / "runs"
    monkeypatch.setattr(sys, "argv", ["reproduce_cifar10lt.py", "--data-root", str(tmp_path), "--out", str(out),
                                      "--device", "cpu", *argv])
    with pytest.raises(SystemExit) as exc:
        table.main()
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_the_child_command_keeps_every_given_limit(table):
    import argparse
    from pathlib import Path

    with pytest.raises(argparse.ArgumentTypeError):
        table.positive(float)("0")
    args = argparse.Namespace(data_root="D", epochs=1, seed=0, device="cpu", eval_every=1, save_every=1, compile=None,
                              amp=None, max_train_samples=5, max_test_samples=None, time_budget_s=30.0, set=[],
                              save_every_for=[("vs", 7)])
    cmd = table.command("ce", args, Path("x"))
    assert cmd[cmd.index("--max-train-samples") + 1] == "5" and cmd[cmd.index("--time-limit-s") + 1] == "5.0"
    assert "--max-test-samples" not in cmd and cmd[cmd.index("--save-every") + 1] == "1"
    vs = table.command("vs", args, Path("y"))
    assert vs[vs.index("--save-every") + 1] == "7"


def test_save_every_for_sets_the_snapshot_interval_of_that_run_alone(table):
    import argparse

    args = argparse.Namespace(data_root="D", epochs=200, seed=0, device="cpu", eval_every=5, save_every=20, compile=None,
                              amp=None, max_train_samples=None, max_test_samples=None, time_budget_s=None, set=[], resume=False,
                              save_every_for=[table.method_interval("ce-drw-pgd=200")])
    configs = table.build_configs(["ce-drw", "ce-drw-pgd"], args)
    assert [c.save_every for c in configs] == [20, 200]
