"""``spectra train`` and ``spectra demo`` on bad input: one-line errors, non-zero
exit, no traceback, nothing already written lost; plus the runs' own stops
(diverged loss, an already complete run) and the spectra probe's progress."""
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cifar_format_fixture import write_cifar10
from spectra.train import TrainConfig, fit, load_training_checkpoint, parse_override, resolve_config
from spectra_cli.demo import demo
from spectra_cli.train import train

TINY = dict(arch="resnet8", batch_size=32, eval_batch_size=64, progress=False, imbalance_ratio=10.0)
TINY_ARGS = ["--batch-size", "32", "--imbalance-ratio", "10", "--set", "arch=resnet8", "--no-progress"]


@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar10(root, train_per_class=12, test_per_class=4)  # LT ratio 10: 46 images
    return root


def one_line_error(result, *words: str) -> str:
    """The ``Error: ...`` line of a failed command, checked to be a clean one-line error naming ``words``."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an uncaught exception
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def run_train(root, out, *args):
    return CliRunner().invoke(train, ["--method", "ce", "--data-root", str(root), "--out", str(out), *TINY_ARGS, *args])


# ---------------------------------------------------------------- --set values
@pytest.mark.parametrize("text, words", [
    ("lr=abc", ["lr=abc", "number"]),
    ("lr=nan", ["lr", "finite"]),
    ("lr=inf", ["lr", "finite"]),
    ("epochs=2.5", ["epochs", "integer"]),
    ("sam_adaptive=maybe", ["sam_adaptive", "true or false"]),
    ("lr_milestones=[1,x]", ["lr_milestones", "list of integers"]),
    ("method=ce-sam", ["method", "--method"]),
    ("dataset=cifar100-lt", ["dataset", "--dataset"]),
    ("weight_decay=-1", ["weight_decay", ">= 0"]),
])
def test_bad_set_values_are_one_line_errors(text, words, tmp_path):
    res = CliRunner().invoke(train, ["--method", "ce", "--out", str(tmp_path / "run"), "--set", text])
    one_line_error(res, *words)
    assert not (tmp_path / "run").exists()


def test_set_values_are_parsed_by_the_setting_type():
    assert parse_override("lr=0.5") == ("lr", 0.5)
    assert parse_override("epochs=3") == ("epochs", 3)
    assert parse_override("lr_milestones=[100,150]") == ("lr_milestones", [100, 150])
    assert parse_override("lr_factors=[1,0.5]") == ("lr_factors", [1.0, 0.5])
    assert parse_override("drw_epoch=null") == ("drw_epoch", None)
    assert parse_override("sam_adaptive=true") == ("sam_adaptive", True)
    assert parse_override("data_root=123") == ("data_root", "123")  # a string setting stays a string
    with pytest.raises(ValueError, match="epochs"):
        parse_override("epochs=null")  # not a nullable setting


def test_option_and_set_of_the_same_setting_conflict(tmp_path):
    res = CliRunner().invoke(train, ["--method", "ce", "--out", str(tmp_path / "run"), "--set", "lr=0.1", "--lr", "0.5"])
    one_line_error(res, "--set lr=0.1", "--lr 0.5", "once")
    res = CliRunner().invoke(train, ["--method", "ce", "--out", str(tmp_path / "run"), "--set", "lr=0.1", "--set", "lr=0.2"])
    one_line_error(res, "lr", "once")
    res = CliRunner().invoke(train, ["--method", "ce", "--out", str(tmp_path / "run"), "--no-progress", "--set", "progress=true"])
    one_line_error(res, "--no-progress", "progress")


# ------------------------------------------------------------ numeric ranges
@pytest.mark.parametrize("args, word", [
    (["--lr", "nan"], "lr"),
    (["--lr", "0"], "lr"),
    (["--weight-decay", "inf"], "weight_decay"),
    (["--rho", "-0.1"], "rho"),
    (["--spectra-every", "-1"], "--spectra-every"),
    (["--max-test-samples", "0"], "--max-test-samples"),
    (["--max-train-samples", "0"], "--max-train-samples"),
    (["--epochs", "0"], "--epochs"),
    (["--time-limit-s", "-1"], "time_limit_s"),
    (["--time-limit-s", "0"], "time_limit_s"),
    (["--imbalance-ratio", "nan"], "imbalance_ratio"),
    (["--set", "momentum=1"], "momentum"),
    (["--set", "tail_fraction=0"], "tail_fraction"),
])
def test_out_of_range_numbers_are_refused(args, word, tmp_path):
    res = CliRunner().invoke(train, ["--method", "ce", "--out", str(tmp_path / "run"), *args])
    assert word in one_line_error(res)
    assert not (tmp_path / "run").exists()


def test_validate_checks_types_and_ranges():
    with pytest.raises(ValueError, match="lr must be a number"):
        TrainConfig(lr="0.1").validate()
    with pytest.raises(ValueError, match="epochs must be an integer"):
        TrainConfig(epochs=True).validate()
    with pytest.raises(ValueError, match="lr_factors must be a finite number"):
        TrainConfig(lr_factors=[0.1, float("nan")]).validate()
    with pytest.raises(ValueError, match="momentum must be >= 0 and < 1"):
        TrainConfig(momentum=1.0).validate()
    TrainConfig(drw_epoch=0, warmup_epochs=0, spectra_every=0, rho=0.0, weight_decay=0.0).validate()  # edges allowed


# -------------------------------------------------------- a diverging run
def test_non_finite_loss_stops_training_and_keeps_earlier_checkpoints(cifar10_root, tmp_path):
    out = tmp_path / "run"
    # epoch 1 trains normally; from epoch 2 the learning rate is 0.1 x 1e30
    res = run_train(cifar10_root, out, "--epochs", "3", "--set", "warmup_epochs=0",
                    "--set", "lr_milestones=[1]", "--set", "lr_factors=[1e30]")
    line = one_line_error(res, "epoch 2", "last.pt (epoch 1) and the earlier checkpoints kept", "--lr")
    assert "nan" in line or "inf" in line or "weights" in line
    assert load_training_checkpoint(out / "last.pt")["epoch"] == 1
    assert (out / "ckpt_epoch0001.pt").exists() and not (out / "ckpt_epoch0002.pt").exists()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["epoch"] for ln in lines] == [1]  # valid JSON, nothing of the diverged epoch
    state = torch.load(out / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


# ------------------------------------------------------- existing run files
def test_out_dir_with_run_files_is_refused_without_resume(cifar10_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt_epoch0001.pt").write_bytes(b"earlier checkpoint")
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    res = run_train(cifar10_root, out, "--epochs", "1")
    one_line_error(res, str(out), "ckpt_epoch0001.pt", "--resume", "--out")
    assert (out / "ckpt_epoch0001.pt").read_bytes() == b"earlier checkpoint"
    assert (out / "metrics.jsonl").read_text() == '{"epoch": 1}\n'
    assert sorted(p.name for p in out.iterdir()) == ["ckpt_epoch0001.pt", "metrics.jsonl"]


def test_out_dir_with_other_files_is_fine(cifar10_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res = run_train(cifar10_root, out, "--epochs", "1")
    assert res.exit_code == 0, res.output
    assert (out / "notes.txt").read_text() == "mine" and (out / "last.pt").exists()


# ------------------------------------------------------ an already complete run
def test_resuming_a_finished_run_says_so_and_keeps_its_summary(cifar10_root, tmp_path):
    out = tmp_path / "run"
    assert run_train(cifar10_root, out, "--epochs", "1").exit_code == 0
    summary = (out / "summary.json").read_text()
    metrics = (out / "metrics.jsonl").read_text()
    res = run_train(cifar10_root, out, "--epochs", "1", "--resume")
    assert res.exit_code == 0, res.output
    assert "already complete" in res.output and "nan" not in res.output
    assert "test acc" in res.output and "epoch 1/1" in res.output
    assert (out / "summary.json").read_text() == summary and (out / "metrics.jsonl").read_text() == metrics


# ------------------------------------------------- the spectra probe's progress
def test_spectra_probe_reports_each_class(cifar10_root, tmp_path):
    lines: list[str] = []
    cfg = resolve_config("ce", data_root=str(cifar10_root), epochs=1, spectra_every=1, spectra_samples_per_class=2,
                         spectra_max_iter=3, **TINY)
    fit(cfg, tmp_path / "run", log=lines.append)
    probe = [ln for ln in lines if "spectra class" in ln]
    assert len(probe) == 10, lines
    assert probe[0].startswith("[ce] epoch 1 spectra class 1/10 (airplane)") and "λmax" in probe[0]
    assert "class 10/10 (truck)" in probe[-1]


def test_foreign_results_file_in_the_run_is_refused_before_training(cifar10_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.h5").write_text("not hdf5")
    res = run_train(cifar10_root, out, "--epochs", "1", "--spectra-every", "1")
    one_line_error(res, "results.h5", "not an HDF5 file")
    assert (out / "results.h5").read_text() == "not hdf5"
    assert not (out / "last.pt").exists()


# ------------------------------------------------------------------ the demo
def test_demo_refuses_a_foreign_results_file_before_training(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "results.h5").write_text("my notes")
    res = CliRunner().invoke(demo, ["--quick", "--out", str(out), "--no-progress"])
    one_line_error(res, "results.h5", "another --out")
    assert (out / "results.h5").read_text() == "my notes"
    assert not (out / "runs").exists()


@pytest.mark.parametrize("epochs", ["1", "0", "-3"])
def test_demo_too_few_epochs_is_explained_in_the_demo_terms(epochs, tmp_path):
    res = CliRunner().invoke(demo, ["--quick", "--epochs", epochs, "--out", str(tmp_path / "o")])
    one_line_error(res, "the demo needs --epochs >= 2", f"got --epochs {epochs}")
    assert not Path(tmp_path / "o").exists()


# ---------------------------------------------- damaged inputs, OS errors
@pytest.mark.parametrize("damage", [b"", b"\xd6garbage", "truncated"])
def test_a_damaged_cifar_file_is_a_one_line_error_naming_it(damage, tmp_path):
    folder = write_cifar10(tmp_path / "data", train_per_class=12, test_per_class=4)
    batch = folder / "data_batch_5"
    batch.write_bytes(batch.read_bytes()[:1000] if damage == "truncated" else damage)
    res = run_train(tmp_path / "data", tmp_path / "run", "--epochs", "1")
    one_line_error(res, f"{batch} is not a CIFAR batch file (truncated or corrupt?)")
    assert not (tmp_path / "run").exists()


def test_a_corrupt_last_pt_is_a_one_line_error_without_torch_advice(cifar10_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_text("garbage\n")
    res = run_train(cifar10_root, out, "--epochs", "1", "--resume")
    one_line_error(res, f"{out / 'last.pt'} is not a readable spectra training checkpoint (corrupt?)")
    assert "weights_only" not in res.output
    assert sorted(p.name for p in out.iterdir()) == ["last.pt"]


def test_an_out_folder_under_a_regular_file_is_a_one_line_error(cifar10_root, tmp_path):
    (tmp_path / "file").write_text("mine")
    res = run_train(cifar10_root, tmp_path / "file" / "run", "--epochs", "1")
    one_line_error(res, "Not a directory", str(tmp_path / "file" / "run"))
    assert (tmp_path / "file").read_text() == "mine"


def test_resume_without_last_pt_but_with_checkpoints_is_a_one_line_error(cifar10_root, tmp_path):
    out = tmp_path / "run"
    assert run_train(cifar10_root, out, "--epochs", "1").exit_code == 0
    (out / "last.pt").unlink()
    metrics = (out / "metrics.jsonl").read_text()
    res = run_train(cifar10_root, out, "--epochs", "1", "--resume")
    one_line_error(res, str(out), "ckpt_epoch0001.pt", "no last.pt")
    assert (out / "metrics.jsonl").read_text() == metrics and not (out / "last.pt").exists()


# -------------------------------------- settings that would silently do nothing
@pytest.mark.parametrize("args, words", [
    (["--batch-size", "1000"], ["batch size 1000 exceeds the 46 training images"]),
    (["--batch-size", "1000", "--set", "last_batch=short"], ["batch size 1000 exceeds the 46 training images"]),
    (["--imbalance-ratio", "10000"], ["imbalance ratio 10000 leaves class", "largest allowed is 12"]),
    (["--imbalance-ratio", "1e9", "--imbalance-profile", "step"], ["imbalance ratio 1e+09", "largest allowed is 12"]),
    (["--dataset", "cifar10", "--imbalance-ratio", "50"], ["imbalance_ratio 50 applies to the -lt data sets only"]),
    (["--method", "ce-drw", "--epochs", "2", "--set", "drw_epoch=50"], ["DRW would never switch on"]),
    (["--seed", "3000000000000"], ["seed must be >= 0 and < 4294967296"]),
    (["--set", "data_seed=4294967296"], ["data_seed must be"]),
    (["--rho", "0.7"], ["--rho 0.7 needs optimizer sam", "ce does not use it "]),
    (["--set", "vs_tau=2", "--set", "pgd_interval=5"], ["--set vs_tau=2 needs loss vs",
                                                       "--set pgd_interval=5 needs optimizer pgd", "does not use them"]),
])
def test_settings_that_would_do_nothing_are_one_line_errors(args, words, cifar10_root, tmp_path):
    defaults = {"--method": "ce", "--epochs": "1", "--batch-size": "32", "--imbalance-ratio": "10"}
    base = ["--data-root", str(cifar10_root), "--out", str(tmp_path / "run"), "--set", "arch=resnet8", "--no-progress"]
    base += [x for option, value in defaults.items() if option not in args for x in (option, value)]
    line = one_line_error(CliRunner().invoke(train, base + args), *words)
    assert "--lt-seed" not in line
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_diverged_pgd_run_points_at_pgd_radius(cifar10_root, tmp_path):
    res = CliRunner().invoke(train, ["--method", "ce-drw-pgd", "--data-root", str(cifar10_root), "--out", str(tmp_path / "run"),
                                     "--epochs", "1", *TINY_ARGS, "--set", "pgd_radius=1e30", "--set", "pgd_interval=1"])
    one_line_error(res, "try a smaller --lr or pgd_radius (now 1e+30; --set pgd_radius=...)")
