"""benchmarks/tail_definitions.py: which k rarest classes make our overall-tail gaps the paper's."""
import json

import pytest

from benchmark_scripts import load_script

COUNTS = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


@pytest.fixture(scope="module")
def tails():
    return load_script("tail_definitions")


def _write_runs(root, paper, k):
    """Runs whose gap (overall − mean of the k rarest) equals the paper's gap, with 6 points off overall."""
    for method, acc, tail in paper:
        spread = [6.0 * (2 * i - k + 1) / (k - 1) for i in range(k)]  # mean 0: only all k rarest together give tail
        per_class = [90.0] * (10 - k) + [tail - 6.0 + d for d in spread]
        acc_ours = acc - 6.0
        run = root / method
        run.mkdir()
        run.joinpath("summary.json").write_text(json.dumps(
            {"final": {"acc": acc_ours, "per_class_acc": per_class}, "class_counts": COUNTS}))


def test_the_matching_tail_size_has_zero_rms_and_the_others_do_not(tails, tmp_path, capsys):
    _write_runs(tmp_path, tails.PAPER, k=4)
    tails.main([str(tmp_path), "--exclude", "vs", "--json", str(tmp_path / "t.json")])
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert rows[3]["k"] == 4 and rows[3]["tail_classes"] == [6, 7, 8, 9]
    assert rows[3]["rms"] == pytest.approx(0.0, abs=1e-9)
    assert min(r["rms"] for r in rows if r["k"] != 4) > 1.0
    assert "| 4 | 6,7,8,9 | 0.00 |" in capsys.readouterr().out


def test_a_folder_without_runs_is_a_one_line_error(tails, tmp_path):
    with pytest.raises(SystemExit, match=r"^error: no finished run of the paper's methods in "):
        tails.main([str(tmp_path)])
