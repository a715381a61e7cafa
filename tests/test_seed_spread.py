"""benchmarks/seed_spread.py: per-method seed statistics and whether a gain over the baseline is established."""
import json

import pytest

from benchmark_scripts import load_script


@pytest.fixture(scope="module")
def spread():
    return load_script("seed_spread")


def _run(root, method, seed, evaluations, tail=50.0, amp="bf16", finished=True, data_root="/data", shas=("tr", "te")):
    """A run folder as spectra train writes it; its final accuracy is its last evaluation.
    ``shas``: its data's (train, test) SHA-256, None for a run that predates them."""
    folder = root / f"{method}-s{seed}"
    folder.mkdir()
    folder.joinpath("config.json").write_text(json.dumps(
        {"method": method, "seed": seed, "dataset": "cifar10-lt", "epochs": 200, "arch": "resnet32", "amp": amp,
         "data_root": data_root}))
    folder.joinpath("summary.json").write_text(json.dumps(
        {"epochs_completed": 200 if finished else 120, "epochs_planned": 200,
         "final": {"acc": evaluations[-1], "tail_acc": tail},
         **({"train_data_sha256": shas[0], "test_data_sha256": shas[1]} if shas else {})}))
    lines = [{"epoch": e, "train_loss": 1.0} for e in range(1, 4)]  # training-only records have no acc
    lines += [{"epoch": 10 * (i + 1), "acc": a} for i, a in enumerate(evaluations)]
    folder.joinpath("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def test_statistics_and_verdicts_follow_the_runs(spread, tmp_path, capsys):
    runs = [_run(tmp_path, "ce-drw", 0, [60.0, 69.0, 69.4], tail=50.0), _run(tmp_path, "ce-drw", 1, [61.0, 69.2, 69.2], tail=52.0),
            _run(tmp_path, "big-gain", 0, [60.0, 72.0, 72.1]), _run(tmp_path, "big-gain", 1, [60.0, 72.2, 71.9]),
            _run(tmp_path, "noise", 0, [60.0, 70.0, 70.2]), _run(tmp_path, "noise", 1, [60.0, 69.0, 69.0]),
            _run(tmp_path, "one-seed", 3, [60.0, 75.0, 75.0])]
    out = tmp_path / "s.json"
    spread.main([str(r) for r in runs] + ["--baseline", "ce-drw", "--last", "2", "--json", str(out)])
    result = json.loads(out.read_text())
    base = result["methods"]["ce-drw"]
    assert base["seeds"] == [0, 1] and base["acc"] == [69.4, 69.2]
    assert base["final"]["mean"] == pytest.approx(69.3) and base["final"]["sd"] == pytest.approx(0.1414, abs=1e-4)
    assert base["tail"]["mean"] == pytest.approx(51.0)
    assert base["last_evaluations"]["mean"] == pytest.approx((69.2 + 69.2) / 2)  # means of the last 2: 69.2, 69.2
    vs = result["against_baseline"]
    assert vs["baseline"] == "ce-drw"
    assert vs["big-gain"]["difference"] == pytest.approx(2.7) and vs["big-gain"]["established"] is True
    assert vs["big-gain"]["welch_p"] < 0.05
    # +0.3 on average, but one seed is below the baseline: not established
    assert vs["noise"]["difference"] == pytest.approx(0.3) and vs["noise"]["established"] is False
    assert vs["noise"]["pair_range"] == pytest.approx([-0.4, 1.0])
    assert vs["one-seed"]["welch_p"] is None and vs["one-seed"]["established"] is None
    printed = capsys.readouterr().out
    assert "| ce-drw | 0,1 | 69.40 / 69.20 → 69.30 ± 0.14 |" in printed
    assert "one-seed − ce-drw: +5.70" in printed and "no test (one seed on a side)" in printed


def test_runs_on_other_images_are_refused(spread, tmp_path):
    """A copy of the data re-encoded (other pixel SHA-256) is another experiment, whatever its path."""
    base = _run(tmp_path, "ce-drw", 0, [69.0])
    other = _run(tmp_path, "ce-drw", 1, [66.0], shas=("tr-q50", "te-q50"))
    with pytest.raises(SystemExit, match=r"^error: .* were trained or tested on different images .*; compare runs on one copy of the data$"):
        spread.main([str(base), str(other), "--baseline", "ce-drw"])


def test_runs_without_data_sha256_fall_back_to_the_data_root(spread, tmp_path):
    old_same = _run(tmp_path, "ce-drw", 0, [69.0], shas=None)  # predates the SHA-256, same root: compared
    new = _run(tmp_path, "ce-drw", 1, [69.4])
    moved = _run(tmp_path, "ce-drw-lpf", 0, [70.0], data_root="/elsewhere")  # same SHA-256 as new, other root: fine
    spread.main([str(old_same), str(new), "--baseline", "ce-drw"])
    spread.main([str(new), str(moved), "--baseline", "ce-drw"])
    old_other = _run(tmp_path, "ce-drw-pgd", 0, [70.0], shas=None, data_root="/data_q50")
    for other in (new, moved):  # without a SHA-256 on one side, another root cannot be told apart from other images
        with pytest.raises(SystemExit, match=r"^error: cannot tell whether .* saw the same images: .*ce-drw-pgd-s0 records "
                                             r"no data SHA-256 \(it predates it\) and their data roots differ \(.*\)$"):
            spread.main([str(other), str(old_other)])


def test_runs_of_another_precision_are_refused(spread, tmp_path):
    runs = [_run(tmp_path, "ce-drw", 0, [69.0]), _run(tmp_path, "ce-drw-lpf", 0, [70.0], amp="off")]
    with pytest.raises(SystemExit, match=r"^error: .* has amp='off' but .* has 'bf16'; compare runs of one recipe$"):
        spread.main([str(r) for r in runs])


def test_an_unfinished_run_and_a_missing_baseline_are_one_line_errors(spread, tmp_path):
    done = _run(tmp_path, "ce-drw", 0, [69.0])
    cut = _run(tmp_path, "ce-drw-pgd", 0, [50.0], finished=False)
    with pytest.raises(SystemExit, match=r"^error: .* stopped at epoch 120 of 200; only finished runs are compared$"):
        spread.main([str(done), str(cut)])
    with pytest.raises(SystemExit, match=r"^error: no run of the baseline 'ce' among the runs \(ce-drw\)$"):
        spread.main([str(done), "--baseline", "ce"])


def test_the_same_seed_twice_is_refused(spread, tmp_path):
    a = _run(tmp_path, "ce-drw", 0, [69.0])
    b = tmp_path / "copy"
    b.mkdir()
    for name in ("config.json", "summary.json", "metrics.jsonl"):
        b.joinpath(name).write_bytes(a.joinpath(name).read_bytes())
    with pytest.raises(SystemExit, match=r"^error: two runs of ce-drw have the same seed \(\[0, 0\]\); each seed once$"):
        spread.main([str(a), str(b)])


def test_a_mistyped_folder_is_an_error_and_a_file_is_skipped(spread, tmp_path, capsys):
    done = _run(tmp_path, "ce-drw", 0, [69.0])
    with pytest.raises(SystemExit, match=r"^error: no such run folder: .*ce-drw-s9$"):
        spread.main([str(done), str(tmp_path / "ce-drw-s9")])
    results_file = tmp_path / "spectra.h5"  # what a glob over a results folder also catches
    results_file.write_bytes(b"")
    spread.main([str(done), str(results_file)])
    assert "| ce-drw | 0 | 69.00 → 69.00 |" in capsys.readouterr().out
