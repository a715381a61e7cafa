"""The CLI and the trainer under ``torchrun`` with 2 CPU ranks (gloo, loopback) against one process.

Each test starts ``python -m torch.distributed.run --standalone --nproc_per_node 2
-m spectra ...`` as a subprocess (one OpenMP thread per rank) on the tiny
checkpoints and synthetic CIFAR-10 of ``tests/tiny_runs.py`` and compares what
rank 0 printed and stored with the same command run in this process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from click.testing import CliRunner

from spectra import results_query, store
from spectra_cli.main import main

from tiny_runs import install_tiny_module, make_run, write_cifar10

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

RTOL = 1e-10  # float64 results of 2 ranks against one process
NO_BN_MODULE = "spectra_test_nobn"
NO_BN_SOURCE = textwrap.dedent('''
    import torch.nn as nn

    class NoBNNet(nn.Module):
        """conv(3→4, stride 2) → ReLU → pool 4×4 → linear: no BatchNorm, so data-parallel
        training equals one process up to float rounding."""

        def __init__(self, num_classes=10, cosine_head=False):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(4)
            self.linear = nn.Linear(64, num_classes)

        def forward(self, x):
            return self.linear(self.pool(self.conv(x).relu()).flatten(1))
''')


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist_cli")
    install_tiny_module(base)
    (base / f"{NO_BN_MODULE}.py").write_text(NO_BN_SOURCE)
    root = write_cifar10(base / "data", per_class=7)  # 7 samples per class: uneven shards 4 + 3
    run = make_run(base / "run", root, epochs=(1, 2))
    return {"base": base, "root": root, "run": base / "run", "ckpt": run[-1]}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same per-process setting as the ranks
    yield
    torch.set_num_threads(threads)


def torchrun(env, *args: str, timeout: float = 180, expect_ok: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m spectra ARGS`` (one thread per rank)."""
    environ = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(env["base"])] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environ.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "spectra", *map(str, args)]
    proc = subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=timeout)
    assert (proc.returncode == 0) == expect_ok, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def invoke(*args: str):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def analysis_args(env) -> list[str]:
    return ["--data-root", env["root"], "--device", "cpu", "--dtype", "float64", "--batch-size", "3"]


def by_entry(path: Path) -> dict[tuple[int, int, str], store.ResultRecord]:
    records = store.read_results(path)
    keyed = {(r.epoch, r.class_index, r.kind): r for r in records}
    assert len(keyed) == len(records), "an entry was stored twice"
    return keyed


def assert_same_arrays(a: store.ResultRecord, b: store.ResultRecord, rtol: float = RTOL) -> None:
    assert set(a.arrays) == set(b.arrays)
    for name in a.arrays:
        if name.endswith("residuals") or name == "stderr":
            continue  # residual norms are rounding-level numbers
        x, y = np.asarray(a.arrays[name]), np.asarray(b.arrays[name])
        scale = max(float(np.abs(x).max(initial=0.0)), 1e-300)
        assert np.abs(x - y).max(initial=0.0) <= rtol * scale, (name, x, y)


def test_eigs_prints_and_writes_once_and_matches_one_process(env, tmp_path):
    args = ["eigs", env["ckpt"], "--class", "0,9", "--tol", "1e-10", "--max-iter", "400", *analysis_args(env), "--json"]
    proc = torchrun(env, *args, "--out", tmp_path / "two.h5")
    two = json.loads(proc.stdout)  # one JSON document: rank 1 printed nothing on stdout
    assert proc.stderr.count("lanczos") >= 1 and "Error" not in proc.stderr
    one = json.loads(invoke(*args).stdout)
    assert [e["class_index"] for e in two] == [0, 9]
    for a, b in zip(one, two):
        assert b["num_samples"] == a["num_samples"] == 7  # the global count, not a shard's
        assert b["sample_indices_sha256"] == a["sample_indices_sha256"]
        assert b["converged"] and a["converged"]
        for end in ("top", "bottom"):
            np.testing.assert_allclose(b["results"][end], a["results"][end], rtol=RTOL, atol=0)
    stored = store.read_results(tmp_path / "two.h5")
    assert len(stored) == 2 and {r.class_index for r in stored} == {0, 9}


def test_sweep_with_density_and_trace_matches_one_process(env, tmp_path):
    args = ["sweep", env["ckpt"], "--classes", "3,4", "--density", "--trace", "--probes", "2", "--steps", "12",
            "--trace-probes", "9", "--tol", "1e-10", "--max-iter", "400", *analysis_args(env)]
    proc = torchrun(env, *args, "--out", tmp_path / "two.h5")
    assert proc.stdout.count("computed 6") == 1  # rank 0 alone reports
    invoke(*args, "--out", tmp_path / "one.h5")
    one, two = by_entry(tmp_path / "one.h5"), by_entry(tmp_path / "two.h5")
    assert one.keys() == two.keys() and len(two) == 6
    for key, record in two.items():
        assert record.provenance["num_samples"] == 7
        assert_same_arrays(one[key], record)
        assert record.key == one[key].key  # same settings hash and checkpoint: same entry


def test_sweep_spreading_jobs_stores_each_entry_once_and_resumes(env, tmp_path):
    out = tmp_path / "jobs.h5"
    base = [*analysis_args(env), "--tol", "1e-8"]
    invoke("sweep", env["run"], "--classes", "0", *base, "--out", out)  # a sweep cut short: class 0 done
    proc = torchrun(env, "sweep", env["run"], "--classes", "0,1,2", "--spread", "jobs", *base, "--out", out)
    assert proc.stdout.count("computed 4, skipped 2") == 1
    invoke("sweep", env["run"], "--classes", "0,1,2", *base, "--out", tmp_path / "one.h5")
    jobs, one = by_entry(out), by_entry(tmp_path / "one.h5")
    assert jobs.keys() == one.keys() and len(jobs) == 6  # 2 checkpoints × 3 classes, each once
    for key, record in jobs.items():
        assert_same_arrays(one[key], record)  # each job ran whole on one rank
    rerun = invoke("sweep", env["run"], "--classes", "0,1,2", *base, "--out", out)
    assert "computed 0, skipped 6" in rerun.stdout


def test_sweep_spreading_jobs_computes_byte_identical_checkpoints_once(env, tmp_path):
    """A run folder holding a copy of another run's checkpoint (a fine-tune started from it): both jobs
    are new, one rank computes it and the twin gets a copy of the entry, as in the serial sweep."""
    twin = tmp_path / "twin"
    twin.mkdir()
    ckpt = sorted(env["run"].glob("ckpt_epoch*.pt"))[0]
    (twin / ckpt.name).write_bytes(ckpt.read_bytes())
    out = tmp_path / "jobs.h5"
    proc = torchrun(env, "sweep", ckpt, twin, "--classes", "0,1", "--spread", "jobs", *analysis_args(env), "--out", out)
    assert "computed 2, skipped 0 (already stored), copied 2" in proc.stdout
    records = store.read_results(out)
    copies = [r for r in records if "alias_of" in r.provenance]
    assert len(records) == 4 and sorted(r.run for r in copies) == ["twin", "twin"]
    originals = {r.key: r for r in records}
    for r in copies:
        assert_same_arrays(originals[r.provenance["alias_of"]], r, rtol=0)


def test_data_parallel_training_matches_one_process(env, tmp_path):
    """1 short epoch of CE+DRW+SAM (class weights on from the start) with a BN-free net:
    the same loss and weights as one process with the global batch; --spectra-every
    stores sweep-schema entries whose eigenvalues match too."""
    from spectra.train import fit, resolve_config

    settings = {"data_root": str(env["root"]), "epochs": 1, "batch_size": 16, "drw_epoch": 0, "device": "cpu",
                "arch": f"{NO_BN_MODULE}:NoBNNet", "progress": False, "spectra_every": 1,
                "spectra_samples_per_class": 5, "spectra_max_iter": 30, "imbalance_ratio": 2.0}
    args = ["train", "--method", "ce-drw-sam", "--dataset", "cifar10-lt", "--out", tmp_path / "two", "--no-progress"]
    args += [x for k, v in settings.items() if k not in ("progress",)
             for x in ("--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}")]
    proc = torchrun(env, *args)
    assert proc.stdout.count("test acc") == 1
    one = fit(resolve_config("ce-drw-sam", "cifar10-lt", **settings), tmp_path / "one", log=lambda m: None)
    two = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    for name, value in one.model.state_dict().items():
        torch.testing.assert_close(two["state_dict"][name], value, rtol=1e-5, atol=1e-6)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["backend"] == "gloo"
    m1, m2 = (json.loads((tmp_path / d / "metrics.jsonl").read_text()) for d in ("one", "two"))
    assert m2["train_loss"] == pytest.approx(m1["train_loss"], rel=1e-5)
    assert m2["train_acc"] == m1["train_acc"]
    # the probe's entries: one per class, in the schema `spectra plot ratio` reads
    e1, e2 = by_entry(tmp_path / "one" / "results.h5"), by_entry(tmp_path / "two" / "results.h5")
    assert e1.keys() == e2.keys() and len(e2) == 10
    table = results_query.eigen_table(tmp_path / "two" / "results.h5")
    assert sorted(table) == list(range(10)) and all(list(s.epochs) == [1] for s in table.values())
    for key, record in e2.items():
        assert record.provenance["checkpoint_path"].endswith("ckpt_epoch0001.pt")
        assert_same_arrays(e1[key], record, rtol=1e-3)  # float32 Lanczos to tol 1e-3


def test_demo_is_refused_under_torchrun(env, tmp_path):
    proc = torchrun(env, "demo", "--quick", "--out", tmp_path / "demo", expect_ok=False)
    assert proc.stderr.count("Error: spectra demo runs in one process") == 1, proc.stderr
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("method, setting, message", [
    ("ce", "last_batch=short", "last_batch='short' is for one process"),
    ("ce-drw-lpf", "lpf_samples=2", "LPF-SGD with lpf_samples=2 is for one process"),  # trained a different step
    ("ce", "bogus=1", "unknown training setting 'bogus'"),  # refused before the group is joined
])
def test_what_does_not_split_over_ranks_is_refused_once(env, tmp_path, method, setting, message):
    """One-line errors from spectra, printed by rank 0 alone (torchrun's launcher then reports the
    failed ranks with its own traceback); nothing trained."""
    proc = torchrun(env, "train", "--method", method, "--dataset", "cifar10-lt", "--out", tmp_path / "run", "--no-progress",
                    "--data-root", env["root"], "--device", "cpu", "--epochs", "1", "--set", setting,
                    expect_ok=False)
    assert proc.stderr.count(f"Error: {message}") == 1, proc.stderr
    assert "ValueError" not in proc.stderr  # spectra's own error is one line, not a Python traceback
    assert not (tmp_path / "run" / "last.pt").exists()
