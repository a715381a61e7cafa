"""benchmarks/paper_protocol_curve.py: exact vs paper's-way |λmin/λmax| over epochs, merged from several files."""
import json

import pytest

from benchmark_scripts import load_script


@pytest.fixture(scope="module")
def curve():
    return load_script("paper_protocol_curve")


def _entry(run, c, epoch, exact, augmented):
    return {"run": run, "class": c, "epoch": epoch,
            "exact": {"lambda_max": exact[0], "lambda_min": exact[1]},
            "ritz_fixed": None,
            "ritz_augmented": [{"seed": s, "lambda_max": a, "lambda_min": b} for s, (a, b) in augmented.items()]}


def _write(path, entries):
    path.write_text(json.dumps({"entries": entries}))
    return path


def test_files_merge_and_seeds_pool(curve, tmp_path, capsys):
    first = _write(tmp_path / "a.json", [_entry("drw", 9, 20, (10.0, -1.0), {0: (20.0, -8.0)}),
                                         _entry("drw", 9, 200, (30.0, -0.6), {0: (40.0, -12.0)})])
    # Epoch 200 again with seeds 0 (already there: kept once) and 1, and another run.
    second = _write(tmp_path / "b.json", [_entry("drw", 9, 200, (30.0, -0.6), {0: (99.0, -1.0), 1: (50.0, -10.0)}),
                                          _entry("sam", 9, 200, (16.0, -1.6), {0: (20.0, -3.0)})])
    out = tmp_path / "t.json"
    curve.main([str(first), str(second), "--json", str(out), "--verbose"])
    rows = {(r["run"], r["epoch"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {("drw", 20), ("drw", 200), ("sam", 200)}
    assert rows["drw", 20]["exact"] == pytest.approx(0.1) and rows["drw", 20]["paper"] == pytest.approx(0.4)
    late = rows["drw", 200]
    assert late["paper_seeds"] == {"0": pytest.approx(0.3), "1": pytest.approx(0.2)}  # the first file's seed 0 kept
    assert late["paper"] == pytest.approx(0.25) and late["inflation"] == pytest.approx(0.25 / 0.02)
    assert rows["sam", 200]["inflation"] == pytest.approx(0.15 / 0.1)
    printed = capsys.readouterr().out
    assert "seeds 0:0.3000 1:0.2000" in printed and "12.5" in printed


def test_the_figure_is_drawn(curve, tmp_path):
    results = _write(tmp_path / "a.json", [_entry(run, c, e, (10.0, -1.0), {0: (10.0, -3.0)})
                                           for run in ("drw", "sam") for c in (0, 9) for e in (1, 20)])
    curve.main([str(results), "--out", str(tmp_path / "curve"), "--mark", "10"])
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_bad_input_is_one_line(curve, tmp_path):
    with pytest.raises(SystemExit, match=r"error: .*missing.json is not a paper_protocol.py result"):
        curve.main([str(tmp_path / "missing.json")])
    (tmp_path / "x.json").write_text("{\"entries\": [{\"run\": 1}]}")
    with pytest.raises(SystemExit, match=r"error: .*x.json is not a paper_protocol.py result \(KeyError"):
        curve.main([str(tmp_path / "x.json")])
    empty = _write(tmp_path / "e.json", [_entry("drw", 9, 20, (10.0, -1.0), {})])
    with pytest.raises(SystemExit, match="error: no entry with a paper's-way"):
        curve.main([str(empty)])
    good = _write(tmp_path / "g.json", [_entry("drw", 9, 20, (10.0, -1.0), {0: (1.0, -1.0)})])
    with pytest.raises(SystemExit, match="error: cannot write a .bmpx image"):
        curve.main([str(good), "--out", str(tmp_path / "c.bmpx")])
