"""The ``spectra`` commands end to end on tiny checkpoints and synthetic CIFAR files:
every loader path, every user error (one line, exit 1, no traceback), JSON
output, stored results, plots, and a sweep killed with SIGKILL then resumed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from spectra import store
from spectra.store import ResultsWriter
from spectra_cli.main import main

from tiny_runs import TINY_ARCH, install_tiny_module, make_run, write_cifar10

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    install_tiny_module(base)
    root = write_cifar10(base / "data")
    runs = {name: make_run(base / name, root, epochs=(1, 2, 3), seed=seed)
            for name, seed in (("ce-drw", 0), ("ce-drw-sam", 1))}
    return {"base": base, "root": root, "runs": runs, "ckpt": runs["ce-drw"][-1]}


def invoke(*args: str):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def fast(env) -> list[str]:
    return ["--data-root", env["root"], "--device", "cpu", "--tol", "1e-4"]


def assert_user_error(result, pattern: str) -> str:
    """Exit 1, one ``Error:`` line matching ``pattern`` on stderr, no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.stderr
    import re

    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


# ------------------------------------------------------------------ commands
def test_eigs_table_json_and_store(env, tmp_path):
    res = invoke("eigs", env["ckpt"], "--class", "truck,0", *fast(env))
    assert res.exit_code == 0, res.output
    assert "spectra checkpoint" in res.stdout and "9 truck" in res.stdout and "0 airplane" in res.stdout

    out = tmp_path / "r.h5"
    res = invoke("eigs", env["ckpt"], "--class", "9", "--top-k", "2", "--json", "--out", out, *fast(env))
    assert res.exit_code == 0, res.output
    (entry,) = json.loads(res.stdout)  # stdout is the JSON and nothing else
    assert entry["class_name"] == "truck" and entry["epoch"] == 3 and entry["num_samples"] == 6
    assert len(entry["results"]["top"]) == 2 and entry["results"]["top"][0] >= entry["results"]["top"][1]
    (rec,) = store.read_results(out)
    assert rec.arrays["top"][0] == pytest.approx(entry["results"]["top"][0])
    assert rec.provenance["checkpoint_sha256"] == entry["checkpoint_sha256"]


def test_density_with_plot_and_trace(env, tmp_path):
    png = tmp_path / "d.png"
    res = invoke("density", env["ckpt"], "--class", "3", "--probes", "2", "--steps", "10", "--plot", png,
                 "--data-root", env["root"], "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == PNG_MAGIC and "mass < -sigma" in res.stdout
    res = invoke("trace", env["ckpt"], "--class", "3", "--trace-probes", "9", "--json",
                 "--data-root", env["root"], "--device", "cpu")
    assert res.exit_code == 0, res.output
    (entry,) = json.loads(res.stdout)
    assert entry["kind"] == "trace" and np.isfinite(entry["results"]["estimate"])


def test_params_restrict_the_hessian(env):
    res = invoke("eigs", env["ckpt"], "--class", "1", "--params", "linear.*", "--json", *fast(env))
    assert res.exit_code == 0, res.output
    (entry,) = json.loads(res.stdout)
    assert entry["num_params"] == 650 and entry["params"] == ["linear.*"]


def _eig_json(res) -> tuple[float, float]:
    assert res.exit_code == 0, res.output
    (entry,) = json.loads(res.stdout)
    return entry["results"]["top"][0], entry["results"]["bottom"][0]


def test_reference_format_and_plain_state_dict_give_the_same_spectrum(env, tmp_path):
    ck = torch.load(env["ckpt"], weights_only=True)
    sd = {f"module.{k}": v for k, v in ck["state_dict"].items()}
    ref = tmp_path / "ckpt.pth.tar"
    torch.save({"epoch": 3, "arch": TINY_ARCH, "state_dict": sd, "best_acc1": torch.tensor(12.5),
                "optimizer": {"state": {}, "param_groups": []}}, ref)
    plain = tmp_path / "weights_epoch3.pt"
    torch.save(sd, plain)
    expected = _eig_json(invoke("eigs", env["ckpt"], "--class", "2", "--json", *fast(env)))
    got_ref = _eig_json(invoke("eigs", ref, "--class", "2", "--dataset", "cifar10", "--json", *fast(env)))
    got_plain = _eig_json(invoke("eigs", plain, "--class", "bird", "--dataset", "cifar10", "--arch", TINY_ARCH,
                                 "--arch-kwargs", '{"num_classes": 10}', "--json", *fast(env)))
    np.testing.assert_allclose(got_ref, expected, rtol=1e-6)
    np.testing.assert_allclose(got_plain, expected, rtol=1e-6)


def test_pickled_module_needs_trust(env, tmp_path):
    from spectra.checkpoints import load_checkpoint

    whole = tmp_path / "model_epoch3.pt"
    torch.save(load_checkpoint(env["ckpt"]).model, whole)
    res = invoke("eigs", whole, "--class", "0", "--dataset", "cifar10", *fast(env))
    assert_user_error(res, r"contains pickled Python objects \(spectra_test_tiny\.TinyNet.*--trust-checkpoint")
    res = invoke("eigs", whole, "--class", "0", "--dataset", "cifar10", "--trust-checkpoint", "--json", *fast(env))
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)[0]["checkpoint_format"] == "pickled-module"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive_is_rebuilt_with_arch(env, tmp_path):
    from spectra.checkpoints import load_checkpoint

    scripted = tmp_path / "tiny_scripted_epoch3.pt"
    torch.jit.save(torch.jit.script(load_checkpoint(env["ckpt"]).model.eval()), str(scripted))
    # Not a built-in: spectra cannot differentiate the script itself and says what to do.
    assert_user_error(invoke("eigs", scripted, "--class", "4", "--dataset", "cifar10", *fast(env)),
                      r"TorchScript model .* pass --arch")
    expected = _eig_json(invoke("eigs", env["ckpt"], "--class", "4", "--json", *fast(env)))
    got = _eig_json(invoke("eigs", scripted, "--class", "4", "--dataset", "cifar10", "--arch", TINY_ARCH,
                           "--json", *fast(env)))
    np.testing.assert_allclose(got, expected, rtol=1e-6)


# ------------------------------------------------------------------ errors
def test_errors_are_one_line_without_traceback(env, tmp_path):
    ck = env["ckpt"]
    plain = tmp_path / "plain.pt"
    torch.save(torch.load(ck, weights_only=True)["state_dict"], plain)
    nan = tmp_path / "ckpt_epoch0009.pt"
    bad = torch.load(ck, weights_only=True)
    bad["state_dict"]["linear.weight"][:] = float("inf")
    torch.save(bad, nan)
    cases = [
        (["eigs", tmp_path / "missing.pt", "--class", "0"], r"checkpoint not found: .*missing\.pt"),
        (["eigs", plain, "--class", "0", "--dataset", "cifar10"], r"holds only weights; pass --arch"),
        (["eigs", plain, "--class", "0", "--arch", "vgg99"], r"unknown architecture 'vgg99'"),
        (["eigs", plain, "--class", "0", "--arch", "resnet20"],
         r"weights do not fit architecture 'resnet20': missing keys \(\d+\): .*unexpected keys \(7\): bn\.bias"),
        (["eigs", ck, "--class", "12"], r"class 12 is out of range: the data set has 10 classes \(0-9\)"),
        (["eigs", ck, "--class", "zebra"], r"unknown class 'zebra'"),
        (["eigs", ck, "--class", "9", "--dataset", "cifar10-lt"], r"class 9 \(truck\) has no samples"),
        (["eigs", nan, "--class", "0"], r"loss is not finite"),
        (["eigs", ck, "--class", "0", "--out", tmp_path / "no" / "dir" / "r.h5"], r"cannot write results file"),
        (["eigs", ck, "--class", "0", "--data-root", tmp_path / "empty"], r"cifar10 not found: .*--data-root"),
        (["eigs", ck, "--class", "0", "--dataset", "nosuchmod:make"], r"cannot import 'nosuchmod'"),
    ]
    for args, pattern in cases:
        extra = [] if "--data-root" in args else ["--data-root", env["root"]]
        assert_user_error(invoke(*args, *extra, "--device", "cpu"), pattern)


def test_download_without_internet_fails_clearly(env, tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    res = invoke("eigs", env["ckpt"], "--class", "0", "--download", "--data-root", tmp_path / "fresh", "--device", "cpu")
    assert_user_error(res, r"could not download https://www\.cs\.toronto\.edu/.*cifar-10-python\.tar\.gz")


def test_results_file_errors(env, tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    assert_user_error(invoke("info", text), r"is not an HDF5 file")
    assert_user_error(invoke("info", foreign), r"not a spectra results file")
    assert_user_error(invoke("info", tmp_path / "none.h5"), r"results file not found")
    assert_user_error(invoke("plot", "ratio", foreign, "-o", tmp_path / "x.png"), r"not a spectra results file")
    assert_user_error(invoke("sweep", env["ckpt"], "--out", foreign, *fast(env)), r"not a spectra results file")
    assert_user_error(invoke("sweep", env["ckpt"], "--out", text, *fast(env)), r"not an HDF5 file; refusing")
    assert text.read_text() == "not hdf5"
    locked = tmp_path / "locked.h5"
    with ResultsWriter(locked):
        res = invoke("sweep", env["ckpt"], "--out", locked, *fast(env))
    assert_user_error(res, rf"locked\.h5 is being written by another process \(pid {os.getpid()}\)")


# ------------------------------------------------------------------ sweep, info, plots
def test_sweep_info_and_plots(env, tmp_path):
    out = tmp_path / "results.h5"
    run_dirs = [env["runs"]["ce-drw"][0].parent, env["runs"]["ce-drw-sam"][0].parent]
    res = invoke("sweep", *run_dirs, "--classes", "0,5,9", "--out", out, "--density", "--probes", "2",
                 "--steps", "10", *fast(env))
    assert res.exit_code == 0, res.output
    assert "computed 36, skipped 0" in res.stdout
    res = invoke("sweep", *run_dirs, "--classes", "0,5,9", "--out", out, "--density", "--probes", "2",
                 "--steps", "10", "--json", *fast(env))
    assert json.loads(res.stdout) == {"out": str(out), "computed": 0, "skipped": 36, "copied": 0, "failed": []}

    res = invoke("info", out)
    assert res.exit_code == 0, res.output
    assert "36 entries" in res.stdout and "ce-drw-sam" in res.stdout and "λmax" in res.stdout
    assert len(json.loads(invoke("info", out, "--json").stdout)) == 36

    ratio = tmp_path / "ratio.png"
    res = invoke("plot", "ratio", out, "-o", ratio)
    assert res.exit_code == 0, res.output
    assert ratio.read_bytes()[:8] == PNG_MAGIC
    dens = tmp_path / "density.png"
    res = invoke("plot", "density", out, "--class", "truck", "--epoch", "3", "--run", "ce-drw", "-o", dens)
    assert res.exit_code == 0, res.output
    assert dens.read_bytes()[:8] == PNG_MAGIC
    assert_user_error(invoke("plot", "density", out, "--class", "9", "--epoch", "3", "-o", dens), r"several runs")
    assert_user_error(invoke("plot", "density", out, "--class", "9", "--epoch", "7", "--run", "ce-drw", "-o", dens),
                      r"no density entry for class 9 at epoch 7")


@pytest.mark.slow
def test_sweep_killed_with_sigkill_then_resumed(env, tmp_path):
    """Kill a sweep once an entry is committed: the file stays readable, no
    partial entry is visible, and the rerun computes only the missing jobs."""
    out = tmp_path / "results.h5"
    run_dir = env["runs"]["ce-drw"][0].parent
    # A tight tolerance makes each job take many products, so the kill lands mid-sweep.
    args = [sys.executable, "-m", "spectra", "sweep", str(run_dir), "--classes", "0,1,2", "--out", str(out),
            "--data-root", str(env["root"]), "--device", "cpu", "--dtype", "float64", "--tol", "1e-14",
            "--max-iter", "30"]
    total = 3 * 3
    pythonpath = os.pathsep.join([str(env["base"]), str(Path(__file__).resolve().parents[1])])
    child_env = {**os.environ, "PYTHONPATH": pythonpath}
    proc = subprocess.Popen(args, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        stored: set[str] = set()
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists():
                try:
                    stored = store.stored_keys(out)
                except Exception:  # file being created this instant
                    stored = set()
                if stored:
                    break
            time.sleep(0.05)
        assert stored, "the sweep committed nothing before the deadline"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    before = {r.key: r.provenance["created_utc"] for r in store.read_results(out)}
    assert 1 <= len(before) < total
    assert all(np.isfinite(r.arrays["top"]).all() for r in store.read_results(out))

    done = subprocess.run(args + ["--json"], env=child_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["skipped"] == len(before) and summary["computed"] == total - len(before)
    after = {r.key: r.provenance["created_utc"] for r in store.read_results(out)}
    assert len(after) == total and all(after[k] == v for k, v in before.items())
    with h5py.File(out, "r") as f:
        assert not [n for n in f["entries"] if n.startswith(".tmp-")]


def test_info_labels_same_name_runs_and_closed_pipe_is_quiet(tmp_path):
    """Two checkpoint folders named ce-drw show as seedA/ce-drw and seedB/ce-drw;
    `spectra info r.h5 | head` (the reader closes early) exits without an Error line."""
    from store_records import make_record

    path = tmp_path / "r.h5"
    with ResultsWriter(path) as w:
        for seed in ("seedA", "seedB"):
            w.write(make_record(1, 0, 10.0, -1.0, run="ce-drw", parent=f"/exp/{seed}"))
    res = invoke("info", path)
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[0].endswith("runs: seedA/ce-drw, seedB/ce-drw")
    assert [line.split()[0] for line in res.stdout.splitlines()[3:]] == ["seedA/ce-drw", "seedB/ce-drw"]
    proc = subprocess.Popen([sys.executable, "-m", "spectra_cli.main", "info", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the child (still importing torch) writes a line
    err = proc.stderr.read().decode()
    proc.wait(120)
    assert proc.returncode == 1 and err == "", err


# ------------------------------------------------------------------ analysis options and partial results
def assert_option_error(result, option: str, pattern: str) -> str:
    """A refused option value: exit 2, one ``Error: Invalid value for 'OPTION'`` line, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.stderr
    import re

    assert lines[0].startswith(f"Error: Invalid value for '{option}'") and re.search(pattern, lines[0]), lines[0]
    return lines[0]


@pytest.fixture
def no_analysis(monkeypatch):
    """Fails the test if any class is analysed: the command had to stop before."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a class was analysed although the arguments were invalid")

    monkeypatch.setattr("spectra_cli.analyze.analyse_class", forbidden)
    monkeypatch.setattr("spectra.sweep.analyse_class", forbidden)


def test_non_finite_and_out_of_range_floats_are_refused(env, tmp_path, no_analysis):
    ck, data = env["ckpt"], ["--data-root", env["root"], "--device", "cpu"]
    cases = [
        (["eigs", "--tol", "inf"], "--tol", r"not in the range 0<x<1"),
        (["eigs", "--tol", "nan"], "--tol", r"'nan' is not a finite number"),
        (["eigs", "--tol", "1"], "--tol", r"not in the range 0<x<1"),
        (["density", "--sigma", "nan"], "--sigma", r"'nan' is not a finite number"),
        (["density", "--sigma", "inf"], "--sigma", r"'inf' is not a finite number"),
        (["density", "--sigma", "0"], "--sigma", r"not in the range x>0"),
        (["trace", "--imbalance-ratio", "nan"], "--imbalance-ratio", r"'nan' is not a finite number"),
        (["trace", "--imbalance-ratio", "0.5"], "--imbalance-ratio", r"not in the range x>=1"),
        (["eigs", "--seed", "99999999999999999999999"], "--seed", r"not in the range 0<=x<=9223372036854775807"),
        (["eigs", "--lt-seed", "-1"], "--lt-seed", r"not in the range 0<=x<=4294967295"),
    ]
    for (command, *option), name, pattern in cases:
        assert_option_error(invoke(command, ck, "--class", "0", *option, *data), name, pattern)
    out = tmp_path / "s.h5"
    assert_option_error(invoke("sweep", ck, "--out", out, "--tol", "nan", *data), "--tol", r"not a finite number")
    assert not out.exists()


def test_max_iter_must_cover_the_eigenvalues_asked_for(env, no_analysis):
    data = ["--data-root", env["root"], "--device", "cpu"]
    assert_option_error(invoke("eigs", env["ckpt"], "--class", "0", "--max-iter", "1", *data), "--max-iter",
                        r"1 is fewer than the 2 eigenvalues asked for \(--top-k 1 \+ --bottom-k 1\)")
    assert_option_error(invoke("eigs", env["ckpt"], "--class", "0", "--top-k", "5", "--bottom-k", "5",
                               "--max-iter", "3", *data), "--max-iter", r"use 10 or more")


def test_max_iter_is_the_lanczos_budget_plus_the_final_check(env):
    """--max-iter 2 with the defaults: 2 products of Lanczos + 2 to measure the residuals."""
    res = invoke("eigs", env["ckpt"], "--class", "0", "--max-iter", "2", "--tol", "1e-12", "--json",
                 "--data-root", env["root"], "--device", "cpu")
    assert res.exit_code == 0, res.output
    (entry,) = json.loads(res.stdout)
    assert entry["num_matvecs"] == 4 and not entry["converged"]
    assert entry["results"]["top"][0] > entry["results"]["bottom"][0]  # two Ritz values, not one shared


def test_too_few_products_are_flagged_with_a_hint(env):
    """Below the 20-product floor nothing is converged; the table says NO and stderr says what to do."""
    res = invoke("eigs", env["ckpt"], "--class", "0", "--max-iter", "6", "--tol", "0.5",
                 "--data-root", env["root"], "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert " NO " in res.stdout
    assert "fewer than 20 products" in res.stderr and "raise --max-iter" in res.stderr


def test_one_end_only(env, tmp_path):
    out = tmp_path / "r.h5"
    for end, other in (("--bottom-k", "top"), ("--top-k", "bottom")):
        res = invoke("sweep", env["ckpt"], "--classes", "0", "--out", out, end, "0", *fast(env))
        assert res.exit_code == 0, res.output
        assert "computed 1, skipped 0" in res.stdout and "Traceback" not in res.stderr
        res = invoke("eigs", env["ckpt"], "--class", "0", end, "0", *fast(env))
        assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    records = store.read_results(out)
    assert sorted((len(r.arrays["top"]), len(r.arrays["bottom"])) for r in records) == [(0, 1), (1, 0)]


def test_sweep_checks_classes_and_probes_before_any_job(env, tmp_path, no_analysis):
    out = tmp_path / "s.h5"
    run_dir = env["runs"]["ce-drw"][0].parent
    assert_user_error(invoke("sweep", run_dir, "--classes", "99", "--out", out, *fast(env)),
                      r"^Error: class 99 is out of range: the data set has 10 classes")
    assert_user_error(invoke("sweep", run_dir, "--classes", "foo", "--out", out, *fast(env)),
                      r"^Error: unknown class 'foo'")
    assert_option_error(invoke("sweep", run_dir, "--trace", "--trace-probes", "2", "--out", out, *fast(env)),
                        "--trace-probes", r"hutch\+\+ needs at least 4 probes, got 2")
    assert_option_error(invoke("sweep", run_dir, "--trace", "--trace-probes", "1", "--trace-method", "hutchinson",
                               "--out", out, *fast(env)), "--trace-probes", r"x>=2")
    assert not out.exists() and not (tmp_path / "s.h5.lock").exists()
    assert_option_error(invoke("trace", env["ckpt"], "--class", "0", "--trace-probes", "3", "--data-root", env["root"]),
                        "--trace-probes", r"hutch\+\+ needs at least 4 probes, got 3")


def test_sweep_progress_knows_its_total_from_the_start(env, tmp_path):
    run_dir = env["runs"]["ce-drw"][0].parent  # 3 checkpoints
    res = invoke("sweep", run_dir, "--classes", "0,1", "--out", tmp_path / "s.h5", *fast(env))
    assert res.exit_code == 0, res.output
    assert "sweep:   0%|          | 0/6" in res.stderr and "?job/s]" not in res.stderr.split("0/6")[0]


def test_trace_shows_progress(env):
    res = invoke("trace", env["ckpt"], "--class", "0,1", "--trace-probes", "9", "--data-root", env["root"], "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "trace:   0%|          | 0/2" in res.stderr  # the classes of the command, on stderr
    assert "trace" not in res.stdout.splitlines()[0]


def test_density_plot_path_is_checked_before_computing(env, tmp_path, no_analysis):
    data = ["--data-root", env["root"], "--device", "cpu"]
    for plot, pattern in ((tmp_path / "x.txt", r"cannot write a \.txt image .*\.png"),
                          (tmp_path / "missing" / "x.png", r"folder .*missing of the output image does not exist")):
        assert_option_error(invoke("density", env["ckpt"], "--class", "0", "--plot", plot, *data), "--plot", pattern)


def test_density_plots_each_class_as_it_is_done(env, tmp_path):
    res = invoke("density", env["ckpt"], "--class", "0,1", "--probes", "1", "--steps", "5", "--plot",
                 tmp_path / "d.svg", "--data-root", env["root"], "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d-class0.svg", "d-class1.svg"]


def _fail_on_class(monkeypatch, bad: int, error: BaseException) -> None:
    from spectra_cli import analyze

    real = analyze.analyse_class

    def analyse(checkpoint, data, *args, **kwargs):
        if data.class_index == bad:
            raise error
        return real(checkpoint, data, *args, **kwargs)

    monkeypatch.setattr(analyze, "analyse_class", analyse)


@pytest.mark.parametrize("command", ["eigs", "density", "trace"])
def test_finished_classes_are_stored_when_a_later_class_fails(env, tmp_path, monkeypatch, command):
    from spectra.analysis import AnalysisError

    _fail_on_class(monkeypatch, 2, AnalysisError("the loss is not finite (nan) on class 2"))
    out = tmp_path / "r.h5"
    own = {"eigs": ["--tol", "1e-4"], "density": ["--probes", "1", "--steps", "5"], "trace": ["--trace-probes", "4"]}
    res = invoke(command, env["ckpt"], "--class", "0,1,2", "--out", out, *own[command],
                 "--data-root", env["root"], "--device", "cpu")
    assert_user_error(res, r"loss is not finite \(nan\) on class 2")
    assert "stored 2 entries (the finished classes)" in res.stderr
    assert sorted(r.class_index for r in store.read_results(out)) == [0, 1]


def test_finished_classes_are_stored_when_interrupted(env, tmp_path, monkeypatch):
    _fail_on_class(monkeypatch, 1, KeyboardInterrupt())
    out = tmp_path / "r.h5"
    res = invoke("eigs", env["ckpt"], "--class", "0,1", "--out", out, *fast(env))
    assert res.exit_code == 1 and "Aborted" in res.stderr and "stored 1 entry (the finished classes)" in res.stderr
    assert [r.class_index for r in store.read_results(out)] == [0]


def test_empty_class_is_refused_before_any_class_is_computed(env, tmp_path, no_analysis):
    out = tmp_path / "r.h5"
    res = invoke("eigs", env["ckpt"], "--class", "0,9", "--dataset", "cifar10-lt", "--out", out, *fast(env))
    assert_user_error(res, r"class 9 \(truck\) has no samples")
    assert not out.exists()


def test_keep_graph_gives_the_same_eigenvalues(env):
    flags = (["--no-keep-graph"], [], ["--keep-graph"], ["--batch-size", "2"])
    runs = [invoke("eigs", env["ckpt"], "--class", "3", "--json", *flag, *fast(env)) for flag in flags]
    assert all(r.exit_code == 0 for r in runs), [r.output for r in runs]
    records = [json.loads(r.stdout)[0] for r in runs]
    assert [r["kept_graph"] for r in records] == [False, True, True, False]  # default: kept iff one batch
    assert {r["hvp_method"] for r in records} == {"double-backward"}  # "auto" resolved on a CPU
    plain, *others = (r["results"] for r in records)
    for kept, rel in zip(others, (1e-12, 1e-12, 1e-6)):  # the last: other batches, fp32 sums in another order
        assert kept["top"] == pytest.approx(plain["top"], rel=rel) and kept["bottom"] == pytest.approx(plain["bottom"], rel=rel)
    res = invoke("eigs", env["ckpt"], "--class", "3", "--keep-graph", "--hvp", "forward-over-reverse", *fast(env))
    assert res.exit_code != 0 and "--keep-graph keeps double-backward graphs" in res.output and "Traceback" not in res.output


# ------------------------------------------------------------------ QA findings
def test_more_eigenvalues_than_parameters_are_refused(env, tmp_path):
    """linear.bias has 10 parameters: --top-k 20 once stored 10 values as top_k 20, 6 + 6 overlapping ends."""
    out = tmp_path / "r.h5"
    for ks in (["--top-k", "20", "--bottom-k", "0"], ["--top-k", "6", "--bottom-k", "6", "--max-iter", "30"]):
        res = invoke("eigs", env["ckpt"], "--class", "9", "--params", "linear.bias", *ks, "--out", out, *fast(env))
        assert_user_error(res, r"bottom-k \d+ eigenvalues asked for, but the Hessian has only 10 .*at most 10$")
    assert not out.exists() or store.read_results(out) == []


def test_misspelt_params_pattern_and_unknown_device_are_one_line_errors(env):
    res = invoke("eigs", env["ckpt"], "--class", "9", "--params", "linear.*", "--params", "linaer.weight", *fast(env))
    assert_user_error(res, r"no trainable parameter matches 'linaer\.weight'$")
    res = invoke("eigs", env["ckpt"], "--class", "9", "--data-root", env["root"], "--device", "foo")
    assert_user_error(res, r"^Error: unknown device 'foo'; use cpu, cuda, cuda:N or auto$")


def test_damaged_results_file_reads_intact_entries_and_refuses_writes(env, tmp_path):
    from test_store import damaged_file

    path = tmp_path / "damaged.h5"
    good, damaged = damaged_file(path)
    res = invoke("info", path)
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    warned = [line for line in res.stderr.splitlines() if line.startswith("Warning:")]
    assert sorted(warned) == sorted(set(warned)) and len(warned) == len(damaged)  # once each, one line
    assert all(any(f"{path}: skipping damaged entry {name}: " in w for w in warned) for name in damaged)
    assert f"{len(good)} entries" in res.stdout
    res = invoke("plot", "ratio", path, "-o", tmp_path / "ratio.png")
    assert res.exit_code == 0 and (tmp_path / "ratio.png").read_bytes()[:8] == PNG_MAGIC, res.output
    before = path.read_bytes()
    res = invoke("eigs", env["ckpt"], "--class", "9", "--out", path, *fast(env))
    assert_user_error(res, rf"{path} is damaged \(entry .*\); refusing to write to it$")
    res = invoke("sweep", env["ckpt"], "--classes", "9", "--out", path, *fast(env))
    assert_user_error(res, rf"{path} is damaged")
    assert path.read_bytes() == before


def test_negative_mass_leaves_the_bulk_near_zero_out():
    """A bulk node at −0.0016 holding 99.6 % of the weight is not negative curvature at σ = 0.045."""
    from spectra.store import ResultRecord
    from spectra_cli.analyze import negative_mass

    arrays = {"nodes": np.array([[-0.0016, -3.0, 50.0], [0.001, -0.5, 60.0]]),
              "weights": np.array([[0.996, 0.002, 0.002], [0.99, 0.006, 0.004]])}
    record = ResultRecord(provenance={"sigma": 0.045}, arrays=arrays)
    assert negative_mass(record) == pytest.approx((0.002 + 0.006) / 2)
