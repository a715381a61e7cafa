"""benchmarks/pgd_noise.py: a continued variant trains and reports; a setting the trainer refuses is one line."""
import json
import sys

import pytest

from benchmark_scripts import load_script
from tiny_training import trained_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory, "ce-drw", epochs=2)


def _main(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["pgd_noise.py", *map(str, argv)])
    load_script("pgd_noise").main()


def test_a_variant_continues_training_and_counts_perturbations(run, tmp_path, monkeypatch):
    root, ckpt = run
    out = tmp_path / "r.json"
    _main(monkeypatch, ckpt, "--data-root", root, "--variant", "every:pgd_interval=1,pgd_radius=0.1", "--no-baseline",
          "--at", 2, "--epochs", 1, "--out", out)
    (row,) = json.loads(out.read_text())["continued"]["every"]["epochs"]
    assert row["epoch"] == 2 and row["perturbations"] >= 1


def test_a_refused_variant_setting_is_one_line(run, monkeypatch):
    root, ckpt = run
    with pytest.raises(SystemExit, match=r"^variant bad: pgd_interval must be >= 1; got 0$"):
        _main(monkeypatch, ckpt, "--data-root", root, "--variant", "bad:pgd_interval=0", "--no-baseline", "--epochs", 1)
