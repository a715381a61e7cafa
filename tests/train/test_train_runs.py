"""End-to-end: one epoch of every preset on a tiny synthetic CIFAR-10-LT,
self-describing checkpoints, resume equality, CIFAR-100-LT code path, CLI."""
import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from cifar_format_fixture import write_cifar10, write_cifar100
from spectra.datasets import DatasetSpec, load_dataset
from spectra.models import build_model
from spectra.train import METHODS, fit, load_training_checkpoint, model_from_checkpoint, resolve_config
from spectra.train.trainer import Trainer

TINY = dict(batch_size=32, eval_batch_size=64, progress=False, imbalance_ratio=10.0, lpf_samples=2, pgd_interval=2)


@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar10(root, train_per_class=12, test_per_class=4)  # LT ratio 10: 12 ... 1 images per class
    return root


@pytest.mark.parametrize("method", list(METHODS))
def test_one_epoch_of_every_preset_writes_a_loadable_checkpoint(method, cifar10_root, tmp_path):
    cfg = resolve_config(method, data_root=str(cifar10_root), epochs=1, **TINY)
    result = fit(cfg, tmp_path / method, log=lambda m: None)
    files = {p.name for p in (tmp_path / method).iterdir()}
    assert {"ckpt_epoch0001.pt", "last.pt", "metrics.jsonl", "summary.json", "config.json"} <= files
    ckpt = torch.load(tmp_path / method / "ckpt_epoch0001.pt", weights_only=True)
    assert ckpt["format"] == "spectra-checkpoint" and ckpt["format_version"] == 1
    assert ckpt["method"] == method and ckpt["epoch"] == 1 and ckpt["arch"] == "resnet32"
    assert ckpt["arch_kwargs"] == {"num_classes": 10, "cosine_head": method.startswith("ldam")}
    assert ckpt["class_names"][0] == "airplane" and ckpt["class_counts"] == [12, 9, 7, 5, 4, 3, 2, 2, 1, 1]
    assert result.summary["train_images"] == sum(ckpt["class_counts"])
    spec = DatasetSpec.from_dict(ckpt["dataset"])  # the summary names the pixels the run trained and tested on
    assert result.summary["train_data_sha256"] == load_dataset(spec).content_sha256()
    assert result.summary["test_data_sha256"] == load_dataset(spec.with_split("test")).content_sha256()
    assert ckpt["dataset"]["name"] == "cifar10-lt" and ckpt["config"]["method"] == method
    json.dumps(ckpt["config"]), json.dumps(ckpt["dataset"]), json.dumps(ckpt["metrics"])  # JSON-able
    # the registry rebuilds the network and reproduces its logits
    model = build_model(ckpt["arch"], **ckpt["arch_kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    x = torch.randn(3, 3, 32, 32)
    result.model.eval()
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), result.model(x), atol=1e-6)
        assert torch.allclose(model_from_checkpoint(ckpt)(x), result.model(x), atol=1e-6)
    metrics = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and {"acc", "per_class_acc", "tail_acc", "many_acc", "medium_acc", "few_acc", "images_per_s"} <= set(metrics[0])
    summary = json.loads((tmp_path / method / "summary.json").read_text())
    assert summary["tail_classes"] == [7, 8, 9] and summary["epochs_completed"] == 1
    assert summary["cpu_threads"] == torch.get_num_threads()
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    # `spectra eigs` accepts the checkpoint with no flags (it records arch and data)
    from click.testing import CliRunner

    from spectra_cli.main import main

    out = CliRunner().invoke(main, ["eigs", str(tmp_path / method / "ckpt_epoch0001.pt"), "--class", "9",
                                    "--max-samples", "1", "--tol", "1e-2", "--max-iter", "4", "--device", "cpu",
                                    "--json"])
    assert out.exit_code == 0, out.output
    record = json.loads(out.stdout)[0]
    assert record["epoch"] == 1 and record["class_index"] == 9 and record["method"] == method


@pytest.mark.parametrize("method, last_batch", [("ce-drw-sam", "wrap"), ("ce-drw-pgd", "wrap"), ("ce-drw-sam", "short")])
def test_resume_ends_with_the_same_weights(method, last_batch, cifar10_root, tmp_path):
    base = dict(data_root=str(cifar10_root), epochs=3, drw_epoch=1, save_every=1, last_batch=last_batch, **TINY)
    full = fit(resolve_config(method, **base), tmp_path / "full", log=lambda m: None)
    # "killed" after epoch 1: a 1 µs time limit stops cleanly after the first epoch
    first = fit(resolve_config(method, time_limit_s=1e-6, **base), tmp_path / "split", log=lambda m: None)
    assert first.summary["stopped_early"] and first.summary["epochs_completed"] == 1
    resumed = fit(resolve_config(method, **base), tmp_path / "split", resume=True, log=lambda m: None)
    assert resumed.summary["epochs_completed"] == 3
    # its timing covers the resumed leg: epochs 2-3, the first of a process untimed (it includes set-up), the last timed
    assert (full.summary["resumed_after_epoch"], full.summary["timed_epochs"]) == (0, 2)
    assert (resumed.summary["resumed_after_epoch"], resumed.summary["timed_epochs"]) == (1, 1)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert all(0 <= json.loads(line)["train_acc"] <= 100 for line in lines)
    last = load_training_checkpoint(tmp_path / "split" / "last.pt")
    assert last["epoch"] == 3
    if method.endswith("pgd"):  # the step counter crosses the resume: perturbations at steps 3, 5, ... of 6
        steps = 3 * -(-sum(last["class_counts"]) // TINY["batch_size"])
        assert last["train_state"]["pgd_count"].item() == (steps - 1) // TINY["pgd_interval"] == 2


def test_resume_without_a_checkpoint_starts_over_without_stale_lines(cifar10_root, tmp_path):
    """A run killed before its first checkpoint left log lines: --resume trains from scratch, drops them."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "acc": 0.0}) + "\n")
    (run / "spectra.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")
    logs = []
    fit(resolve_config("ce", data_root=str(cifar10_root), epochs=1, **TINY), run, resume=True, log=logs.append)
    assert any("starting from scratch" in m for m in logs)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1] and "per_class_acc" in lines[0]  # the new line, not the stale one
    assert (run / "spectra.jsonl").read_text() == ""


def test_resume_refuses_a_changed_recipe(cifar10_root, tmp_path):
    fit(resolve_config("ce", data_root=str(cifar10_root), epochs=1, **TINY), tmp_path / "run", log=lambda m: None)
    with pytest.raises(ValueError, match="settings differ"):
        fit(resolve_config("ce", data_root=str(cifar10_root), epochs=1, lr=0.5, **TINY), tmp_path / "run", resume=True, log=lambda m: None)
    with pytest.raises(ValueError, match="settings differ from the run in .*: max_test_samples"):
        fit(resolve_config("ce", data_root=str(cifar10_root), epochs=1, **{**TINY, "max_test_samples": 7}), tmp_path / "run",
            resume=True, log=lambda m: None)


def test_resume_refuses_other_images_but_follows_moved_data(cifar10_root, tmp_path):
    """data_root may change on resume (the data moved); the images may not (another copy, e.g. re-encoded)."""
    import shutil

    settings = dict(epochs=2, time_limit_s=1e-9, **TINY)  # stops after epoch 1
    fit(resolve_config("ce", data_root=str(cifar10_root), **settings), tmp_path / "run", log=lambda m: None)
    moved = tmp_path / "moved"
    shutil.copytree(cifar10_root, moved)
    fit(resolve_config("ce", data_root=str(moved), **settings), tmp_path / "run", resume=True, log=lambda m: None)
    other = tmp_path / "other"
    write_cifar10(other, train_per_class=12, test_per_class=4, seed=5)  # same shapes and counts, other pixels
    with pytest.raises(ValueError, match=r"^--resume: the images under .*other are not those the run in .* was trained "
                                         r"and tested on \(their SHA-256 differs\); resume with the run's copy of the data$"):
        fit(resolve_config("ce", data_root=str(other), **settings), tmp_path / "run", resume=True, log=lambda m: None)


def test_a_run_made_before_a_newer_check_still_resumes(cifar10_root, tmp_path, monkeypatch):
    """lr_milestones >= epochs were accepted before; such a run must resume (the check is for new runs)."""
    from spectra.train import TrainConfig

    settings = dict(data_root=str(cifar10_root), epochs=2, lr_milestones=[5], lr_factors=[0.1], **TINY)
    with monkeypatch.context() as old_version:
        old_version.setattr(TrainConfig, "_check_combinations", lambda self: None)
        fit(resolve_config("ce", time_limit_s=1e-9, **settings), tmp_path / "run", log=lambda m: None)  # epoch 1 only
    with pytest.raises(ValueError, match="never happen"):
        resolve_config("ce", **settings)
    result = fit(resolve_config("ce", new_run=False, **settings), tmp_path / "run", resume=True, log=lambda m: None)
    assert result.summary["final"]["epoch"] == 2
    with pytest.raises(ValueError, match="never happen"):  # in an empty folder --resume starts a new run: checked
        fit(resolve_config("ce", new_run=False, **settings), tmp_path / "new", resume=True, log=lambda m: None)


def test_resume_may_change_the_evaluation_interval(cifar10_root, tmp_path):
    """Evaluations do not touch the weights: a run resumed with another eval_every ends where an uninterrupted one does."""
    cfg = resolve_config("ce", data_root=str(cifar10_root), epochs=4, eval_every=1, **TINY)
    full = fit(cfg, tmp_path / "full", log=lambda m: None)
    fit(dataclasses.replace(cfg, time_limit_s=1e-9), tmp_path / "run", log=lambda m: None)  # stops after epoch 1
    resumed = fit(dataclasses.replace(cfg, eval_every=2), tmp_path / "run", resume=True, log=lambda m: None)
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 4] and json.loads((tmp_path / "run" / "config.json").read_text())["eval_every"] == 2
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cifar100_lt_code_path_on_synthetic_files(tmp_path):
    write_cifar100(tmp_path / "data", train_per_class=10, test_per_class=1, bytes_keys=True)
    cfg = resolve_config("ldam-drw-sam", "cifar100-lt", data_root=str(tmp_path / "data"), epochs=1, **TINY)
    assert cfg.rho == 0.8
    result = fit(cfg, tmp_path / "run", log=lambda m: None)
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["num_classes"] == 100 and ckpt["class_names"][5] == "class05"
    assert ckpt["class_counts"][0] == 10 and ckpt["class_counts"][-1] == 1  # int(10 · 0.1^(c/99))
    assert len(result.summary["tail_classes"]) == 30


def test_cli_train_and_errors(cifar10_root, tmp_path):
    from spectra_cli.train import train

    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["--method", "ce-drw", "--data-root", str(cifar10_root), "--out", str(out), "--epochs", "1", "--batch-size", "32",
            "--imbalance-ratio", "10", "--no-progress", "--set", "drw_epoch=0"]
    res = runner.invoke(train, args)
    assert res.exit_code == 0, res.output
    assert "test acc" in res.output and (out / "ckpt_epoch0001.pt").exists()
    assert json.loads((out / "config.json").read_text())["drw_epoch"] == 0
    again = runner.invoke(train, args)
    assert again.exit_code != 0 and "--resume" in again.output
    bad = runner.invoke(train, ["--method", "ce", "--out", str(tmp_path / "x"), "--set", "nope=1"])
    assert bad.exit_code != 0 and "unknown training setting" in bad.output and "Traceback" not in bad.output
    missing = runner.invoke(train, ["--method", "ce", "--out", str(tmp_path / "y"), "--data-root", str(tmp_path / "none")])
    assert missing.exit_code != 0 and "--data-root" in missing.output


def test_fit_many_equals_separate_runs(cifar10_root, tmp_path):
    from spectra.train import fit_many

    base = dict(data_root=str(cifar10_root), epochs=2, drw_epoch=1, **TINY)
    configs = [resolve_config("ce-drw-sam", **base), resolve_config("vs", **base)]
    together = fit_many(configs, [tmp_path / "a", tmp_path / "b"], log=lambda m: None)
    alone = [fit(c, tmp_path / f"alone{i}", log=lambda m: None) for i, c in enumerate(configs)]
    for x, y in zip(together, alone):
        sx, sy = x.model.state_dict(), y.model.state_dict()
        assert all(torch.equal(sx[k], sy[k]) for k in sx)
        assert x.summary["epochs_completed"] == 2 and (x.out_dir / "summary.json").exists()


@pytest.mark.slow
def test_spectra_every_stores_per_class_extremes(cifar10_root, tmp_path):
    cfg = resolve_config("ce-drw", data_root=str(cifar10_root), epochs=1, spectra_every=1, spectra_samples_per_class=4, spectra_max_iter=8, **TINY)
    fit(cfg, tmp_path / "run", log=lambda m: None)
    record = json.loads((tmp_path / "run" / "spectra.jsonl").read_text().splitlines()[0])
    assert record["epoch"] == 1 and record["classes"] == list(range(10))
    for lmax, lmin, ratio in zip(record["lambda_max"], record["lambda_min"], record["ratio"]):
        assert lmin <= lmax and ratio == pytest.approx(abs(lmin / lmax))


def test_snapshots_without_optimizer_state_load_for_analysis(cifar10_root, tmp_path):
    """snapshot_optimizer=False: ckpt_epoch files carry weights only (smaller), last.pt still resumes."""
    from spectra.checkpoints import load_checkpoint

    base = dict(data_root=str(cifar10_root), epochs=3, save_every=1, **TINY)
    # stopped by a 1 µs time limit after epoch 1
    result = fit(resolve_config("ce-drw-sam", snapshot_optimizer=False, time_limit_s=1e-6, **base), tmp_path / "run", log=lambda m: None)
    snap = torch.load(tmp_path / "run" / "ckpt_epoch0001.pt", weights_only=True)
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert "optimizer" not in snap and "optimizer" in last and snap["epoch"] == last["epoch"] == 1
    assert (tmp_path / "run" / "ckpt_epoch0001.pt").stat().st_size < 0.6 * (tmp_path / "run" / "last.pt").stat().st_size
    loaded = load_checkpoint(tmp_path / "run" / "ckpt_epoch0001.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.model.eval()(x), result.model.eval()(x), atol=1e-6)
    # the setting is bookkeeping: a resume may change it
    more = fit(resolve_config("ce-drw-sam", **base), tmp_path / "run", resume=True, log=lambda m: None)
    assert more.summary["epochs_completed"] == 3
    assert "optimizer" in torch.load(tmp_path / "run" / "ckpt_epoch0003.pt", weights_only=True)


# ------------------------------------------------- existing runs and resume
SMALL = dict(TINY, arch="resnet8")


@pytest.mark.parametrize("kept", ["ckpt_epoch0001.pt", "summary.json"])
def test_resume_refuses_run_files_without_last_pt(kept, cifar10_root, tmp_path):
    """Checkpoints or a summary without last.pt: a run exists; starting over would overwrite it."""
    run = tmp_path / "run"
    fit(resolve_config("ce", data_root=str(cifar10_root), epochs=1, **SMALL), run, log=lambda m: None)
    for path in run.iterdir():
        if path.name not in (kept, "metrics.jsonl", "config.json"):
            path.unlink()
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(ValueError) as err:
        fit(resolve_config("ce", data_root=str(cifar10_root), epochs=1, **SMALL), run, resume=True, log=lambda m: None)
    message = str(err.value)
    assert f"{run} holds run files ({kept}" in message and "no last.pt" in message and "\n" not in message
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_fit_refuses_a_folder_holding_a_run(cifar10_root, tmp_path):
    """Library fit without resume: the CLI's refusal, nothing of the first run touched."""
    run = tmp_path / "run"
    fit(resolve_config("ce", data_root=str(cifar10_root), epochs=1, **SMALL), run, log=lambda m: None)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(ValueError, match=r"already holds a run \(ckpt_epoch0001.pt, last.pt, metrics.jsonl, \.\.\.\); "
                                         r"pass --resume to continue it"):
        fit(resolve_config("ce", data_root=str(cifar10_root), epochs=1, lr=0.05, **SMALL), run, log=lambda m: None)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_resuming_a_finished_run_changes_no_file(cifar10_root, tmp_path):
    run = tmp_path / "run"
    cfg = resolve_config("ce", data_root=str(cifar10_root), epochs=1, spectra_every=1, spectra_samples_per_class=2,
                         spectra_max_iter=3, **SMALL)
    fit(cfg, run, log=lambda m: None)

    def state():
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_mode, p.read_bytes()) for p in run.iterdir()}

    before = state()
    assert {"metrics.jsonl", "spectra.jsonl", "results.h5", "last.pt", "summary.json"} <= set(before)
    assert fit(cfg, run, resume=True, log=lambda m: None).already_complete
    assert state() == before


def test_resume_names_a_corrupt_metrics_line_and_drops_a_torn_last_line(cifar10_root, tmp_path):
    run = tmp_path / "run"
    cfg = resolve_config("ce", data_root=str(cifar10_root), epochs=1, **SMALL)
    fit(cfg, run, log=lambda m: None)
    metrics = run / "metrics.jsonl"
    good = metrics.read_text()
    metrics.write_text(good + '{"epoch": 2, "acc"\n' + good)
    with pytest.raises(ValueError, match=rf"^{metrics} line 2 is not a JSON record \(.*\); fix or remove that line$"):
        fit(cfg, run, resume=True, log=lambda m: None)
    metrics.write_text(good + '{"epoch": 2, "ac')  # a kill during the append
    fit(cfg, run, resume=True, log=lambda m: None)
    assert metrics.read_text() == good


class _Killed(Exception):
    """Stands for a kill: raised from the log callback in the middle of the spectra probe."""


def test_a_kill_inside_the_spectra_probe_is_completed_on_resume(cifar10_root, tmp_path, monkeypatch):
    from collections import Counter

    from spectra.analysis import analyse_class
    from spectra.store import read_results

    cfg = resolve_config("ce", data_root=str(cifar10_root), epochs=2, spectra_every=1, spectra_samples_per_class=2,
                         spectra_max_iter=3, **SMALL)
    full = fit(cfg, tmp_path / "full", log=lambda m: None)
    probed: list[str] = []

    def killed_after_two_classes(message: str) -> None:
        if "spectra class" in message:
            probed.append(message)
            if len(probed) == 2:
                raise _Killed

    run = tmp_path / "run"
    with pytest.raises(_Killed):
        fit(cfg, run, log=killed_after_two_classes)
    before = {r.key: r.provenance["created_utc"] for r in read_results(run / "results.h5")}
    assert load_training_checkpoint(run / "last.pt")["epoch"] == 1 and len(before) == 2
    logs: list[str] = []
    analysed = []
    counted = lambda *a, **k: analysed.append(1) or analyse_class(*a, **k)  # noqa: E731
    monkeypatch.setattr("spectra.train.spectra_probe.analyse_class", counted)
    resumed = fit(cfg, run, resume=True, log=logs.append)
    assert len(analysed) == 8 + 10  # the 2 classes stored before the kill are read back, not recomputed
    after = {r.key: r.provenance["created_utc"] for r in read_results(run / "results.h5")}
    assert all(after[k] == t for k, t in before.items())
    assert any("spectra probe of epoch 1 did not finish" in m for m in logs), logs
    lines = [json.loads(line) for line in (run / "spectra.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and all(r["classes"] == list(range(10)) for r in lines)
    entries = Counter((r.epoch, r.class_index) for r in read_results(run / "results.h5"))
    assert sorted(entries) == [(e, c) for e in (1, 2) for c in range(10)] and set(entries.values()) == {1}
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the probe again at the same point: training unchanged


def test_cuda_graphs_on_the_cpu_say_so_in_one_log_line(cifar10_root, tmp_path, recwarn):
    logs: list[str] = []
    cfg = resolve_config("ce", data_root=str(cifar10_root), epochs=1, compile="graphs", device="cpu", **SMALL)
    fit(cfg, tmp_path / "run", log=logs.append)
    assert "[ce] --compile graphs: CUDA graphs need a CUDA device; training eagerly" in logs
    assert not [w for w in recwarn if "CUDA graphs" in str(w.message)]


def test_sync_bn_on_a_cpu_is_refused_in_one_process_too(cifar10_root, tmp_path):
    """It was refused under torchrun only; one process recorded sync_bn=true and synchronised nothing."""
    with pytest.raises(ValueError, match="--sync-bn needs CUDA devices"):
        fit(resolve_config("ce", data_root=str(cifar10_root), epochs=1, device="cpu", sync_bn=True, **TINY),
            tmp_path / "run", log=lambda m: None)
    assert not (tmp_path / "run" / "config.json").exists()


def _first_conv(model: torch.nn.Module) -> torch.Tensor:
    return next(m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d))


@pytest.mark.parametrize("method", ["ce-drw-sam", "ce-drw-pgd", "ce-drw-lpf"])
def test_channels_last_is_the_cpu_default_and_changes_only_rounding(method, cifar10_root, tmp_path):
    """The same run in NHWC (the CPU default) and NCHW ends with the same weights up to fp32 rounding, on
    the tanh network of the reference-loop test (a ReLU kink turns rounding into another path)."""
    base = dict(data_root=str(cifar10_root), epochs=2, drw_epoch=1, device="cpu", arch="smooth_net:SmoothNet", **TINY)
    nhwc = fit(resolve_config(method, **base), tmp_path / "auto", log=lambda m: None)  # channels_last=None: on for CPUs
    nchw = fit(resolve_config(method, channels_last=False, **base), tmp_path / "nchw", log=lambda m: None)
    assert _first_conv(nhwc.model).is_contiguous(memory_format=torch.channels_last) and not _first_conv(nhwc.model).is_contiguous()
    assert _first_conv(nchw.model).is_contiguous()
    sa, sb = nhwc.model.state_dict(), nchw.model.state_dict()
    assert not all(torch.equal(sa[k], sb[k]) for k in sa)  # the two formats really ran different kernels
    initial = Trainer(resolve_config(method, **base), tmp_path / "initial", log=lambda m: None).model.state_dict()
    assert max(float((sa[k].double() - v.double()).abs().max()) for k, v in initial.items()) > 1e-2  # the runs did train
    for k in sa:  # the reference-loop test's bound
        assert (sa[k].double() - sb[k].double()).norm() <= 1e-4 * sb[k].double().norm() + 1e-7, k
    reloaded = model_from_checkpoint(load_training_checkpoint(tmp_path / "auto" / "last.pt", map_location="cpu"))
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in sa.items())


def test_resume_keeps_the_stored_memory_format_unless_asked(cifar10_root, tmp_path):
    """A run made with channels_last=False (the old default) resumes NCHW, bit for bit, when the option
    is not given (None); an explicit channels_last=True switches it."""
    base = dict(data_root=str(cifar10_root), epochs=2, device="cpu", arch="resnet8", **TINY)
    whole = fit(resolve_config("ce-sam", channels_last=False, **base), tmp_path / "whole", log=lambda m: None)
    for name in ("kept", "switched"):
        fit(resolve_config("ce-sam", channels_last=False, time_limit_s=1e-6, **base), tmp_path / name, log=lambda m: None)
    kept = fit(resolve_config("ce-sam", **base), tmp_path / "kept", resume=True, log=lambda m: None)
    assert kept.summary["epochs_completed"] == 2 and _first_conv(kept.model).is_contiguous()
    assert all(torch.equal(v, whole.model.state_dict()[k]) for k, v in kept.model.state_dict().items())
    assert json.loads((tmp_path / "kept" / "config.json").read_text())["channels_last"] is False
    switched = fit(resolve_config("ce-sam", channels_last=True, **base), tmp_path / "switched", resume=True, log=lambda m: None)
    assert switched.summary["epochs_completed"] == 2
    assert _first_conv(switched.model).is_contiguous(memory_format=torch.channels_last)


def test_a_relative_data_root_is_recorded_absolute(cifar10_root, tmp_path, monkeypatch):
    """`spectra train --data-root data` then `spectra eigs` from another folder: the checkpoint names the data."""
    monkeypatch.chdir(cifar10_root.parent)
    fit(resolve_config("ce", data_root=cifar10_root.name, epochs=1, device="cpu", arch="resnet8", **TINY), tmp_path / "run",
        log=lambda m: None)
    ckpt = load_training_checkpoint(tmp_path / "run" / "last.pt", map_location="cpu")
    stored = ckpt["config"]["data_root"]
    assert stored == str(cifar10_root.resolve()) == ckpt["dataset"]["root"]  # the analyses read the latter
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data_root"] == stored


def test_a_probe_added_on_resume_is_not_called_unfinished(cifar10_root, tmp_path):
    base = dict(data_root=str(cifar10_root), epochs=2, device="cpu", arch="resnet8", **TINY)
    fit(resolve_config("ce", time_limit_s=1e-6, **base), tmp_path / "run", log=lambda m: None)  # epoch 1, no probe
    logs: list[str] = []
    fit(resolve_config("ce", spectra_every=1, spectra_samples_per_class=2, spectra_max_iter=3, **base), tmp_path / "run",
        resume=True, log=logs.append)
    assert any("running the spectra probe of epoch 1, the epoch resumed from" in m for m in logs), logs
    assert not any("did not finish" in m for m in logs)
    assert [json.loads(x)["epoch"] for x in (tmp_path / "run" / "spectra.jsonl").read_text().splitlines()] == [1, 2]
