"""The examples run (CPU ones, on tiny settings) and the GPU script's commands
are valid ``spectra`` invocations."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import click
import h5py
import numpy as np
import pytest
from PIL import Image

from spectra_cli.main import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# One thread: the examples' products are small, and on shared cores OpenMP threads thrash.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(args: list[str], cwd: Path) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _valid_png(path: Path) -> None:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and len(set(np.asarray(im.convert("L")).ravel().tolist())) > 10


def test_own_model_analysis_runs(tmp_path: Path) -> None:
    out = _run([str(EXAMPLES / "own_model_analysis.py"), "--epochs", "3", "--plot", str(tmp_path / "d.png")], tmp_path)
    rows = [line.split() for line in out.splitlines() if line.startswith(("common", "rare", "very rare"))]
    assert len(rows) == 3
    for row in rows:
        n, lam_max, lam_min, ratio, residual = (float(v) for v in row[-8:-3])
        assert n in (600, 120, 30) and lam_max > 0 and lam_min <= lam_max
        assert ratio == pytest.approx(abs(lam_min / lam_max), rel=1e-2)
        assert residual <= 1e-6 * max(abs(lam_max), abs(lam_min))  # tol 1e-8, measured
        last_layer = float(row[-1])
        assert 0 < last_layer <= lam_max * (1 + 1e-6)  # interlacing: a diagonal block's λmax ≤ λmax
    _valid_png(tmp_path / "d.png")


def test_per_layer_spectrum_runs_and_interlaces(tmp_path: Path) -> None:
    out = _run([str(EXAMPLES / "per_layer_spectrum.py"), "--class", "9", "--epochs", "2", "--max-samples", "8",
                "--tol", "1e-3", "--out", str(tmp_path / "pl")], tmp_path)
    assert "whole network" in out
    with h5py.File(tmp_path / "pl" / "per_layer.h5", "r") as f:
        entries = [g for name, g in f["entries"].items()]
        rows = {json.dumps(json.loads(g.attrs["params"])): (g["top"][0], g["bottom"][0], g.attrs["num_params"])
                for g in entries}
    whole = rows.pop("null")
    assert sorted(rows) == sorted(json.dumps([f"{b}.*"]) for b in ("conv1", "bn1", "layer1", "layer2", "layer3", "linear"))
    assert sum(n for _, _, n in rows.values()) == whole[2] == 75290
    for lam_max, lam_min, _ in rows.values():  # Cauchy interlacing (Ritz values, 1e-3 residuals)
        assert lam_max <= whole[0] * 1.01 and lam_min >= whole[1] - 0.01 * whole[0]
    _valid_png(tmp_path / "pl" / "per_layer.png")


@pytest.mark.parametrize("script, names", [
    ("cifar10lt_figure_gpu.sh", ["train", "train", "sweep", "sweep", "plot ratio", "plot density", "info"]),
    ("cifar10lt_figure_cpu.sh", ["train", "train", "plot ratio", "sweep", "plot density", "info"]),
])
def test_figure_script_commands_parse(script: str, names: list[str]) -> None:
    path = EXAMPLES / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    proc = subprocess.run(["bash", str(path)], env={**ENV, "DRY_RUN": "1", "DATA_ROOT": "/data", "MAX_SAMPLES": "500",
                                                     "RHO": "0.1", "AMP": "bf16"},
                          capture_output=True, text=True, check=True)
    commands = [shlex.split(line[2:]) for line in proc.stderr.splitlines() if line.startswith("+ spectra ")]
    assert [" ".join(c[1:3]) if c[1] == "plot" else c[1] for c in commands] == names
    for argv in commands:  # every option exists and every value parses
        args, cmd = argv[1:], main
        ctx = click.Context(main)
        while isinstance(cmd, click.Group):
            cmd = cmd.get_command(ctx, args.pop(0))
        cmd.make_context(cmd.name, args)
    if "gpu" in script:
        assert any("--max-samples" in c and "500" in c for c in commands)
    else:  # RHO reaches the SAM run only; both runs' own results files in one ratio figure
        assert [c[c.index("--method") + 1] for c in commands if "--rho" in c] == ["ce-drw-sam"]
        assert [c[c.index("--amp") + 1] for c in commands if "--amp" in c] == ["bf16", "bf16"]  # both runs
        ratio = next(c for c in commands if c[1:3] == ["plot", "ratio"])
        assert [a for a in ratio if a.endswith("results.h5")] == [
            "runs/cifar10lt-figure-cpu/ce-drw/results.h5", "runs/cifar10lt-figure-cpu/ce-drw-sam/results.h5"]


def test_cpu_figure_script_resumes_the_sam_run_with_its_rho(tmp_path) -> None:
    """A rerun after a cut: --resume and the same --rho (a resume with another ρ is refused)."""
    (tmp_path / "ce-drw-sam").mkdir()
    (tmp_path / "ce-drw-sam" / "last.pt").write_bytes(b"")
    proc = subprocess.run(["bash", str(EXAMPLES / "cifar10lt_figure_cpu.sh")],
                          env={**ENV, "DRY_RUN": "1", "DATA_ROOT": "/data", "RHO": "0.1", "OUT": str(tmp_path)},
                          capture_output=True, text=True, check=True)
    sam = [shlex.split(line[2:]) for line in proc.stderr.splitlines() if "--method ce-drw-sam" in line]
    assert len(sam) == 1 and "--resume" in sam[0] and sam[0][sam[0].index("--rho") + 1] == "0.1"
