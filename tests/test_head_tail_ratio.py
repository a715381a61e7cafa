"""benchmarks/head_tail_ratio.py: head and tail mean |λmin/λmax| per run and epoch."""
import json

import pytest

from benchmark_scripts import load_script
from spectra.store import ResultsWriter
from store_records import make_record

COUNTS = [5, 50, 20, 1]  # by size: head 1, 2; tail 3, 0


@pytest.fixture(scope="module")
def head_tail():
    return load_script("head_tail_ratio")


def _record(epoch, cls, lam_max, lam_min, run):
    record = make_record(epoch, cls, lam_max, lam_min, run=run)
    record.provenance["class_counts"] = COUNTS
    return record


def _results(tmp_path):
    """Two runs; run "b" has no entry of class 0 at epoch 20 (a sweep still running)."""
    path = tmp_path / "r.h5"
    with ResultsWriter(path) as w:
        for run, scale in (("a", 1.0), ("b", 2.0)):
            for epoch in (10, 20):
                for cls in range(4):
                    if run == "b" and epoch == 20 and cls == 0:
                        continue
                    w.write(_record(epoch, cls, 10.0 * (cls + 1), -scale * epoch * (cls + 1) / 10, run))
    return path


def test_groups_follow_the_recorded_class_sizes(head_tail):
    sizes = dict(enumerate(COUNTS))
    assert head_tail.head_and_tail(sizes, 1) == ([1], [3])
    assert head_tail.head_and_tail(sizes, 2) == ([1, 2], [0, 3])
    assert head_tail.head_and_tail({0: 3, 1: 3, 2: 3, 3: 3}, 1) == ([0], [3])  # ties by class index
    with pytest.raises(SystemExit, match="--group 3 needs 6 classes; the file has 4"):
        head_tail.head_and_tail(sizes, 3)


def test_means_per_run_and_epoch_and_a_missing_class(head_tail, tmp_path, capsys):
    path = _results(tmp_path)
    out = tmp_path / "s.json"
    head_tail.main([str(path), "--group", "2", "--json", str(out)])
    summary = json.loads(out.read_text())
    assert summary["head"] == [1, 2] and summary["tail"] == [0, 3]
    # |λmin/λmax| of class c at epoch e in run of scale s: s * e / 100 (the class cancels).
    a, b = summary["runs"]["a"], summary["runs"]["b"]
    assert [row["epoch"] for row in a] == [10, 20]
    assert a[0]["head_ratio"] == pytest.approx(0.1) and a[1]["tail_ratio"] == pytest.approx(0.2)
    assert b[0]["tail_ratio"] == pytest.approx(0.2) and b[1]["head_ratio"] == pytest.approx(0.4)
    assert b[1]["tail_ratio"] is None and sorted(b[1]["lambda"]) == ["1", "2", "3"]
    assert a[1]["lambda"]["3"] == pytest.approx([40.0, -8.0])
    text = capsys.readouterr().out
    assert "class 3 λmax / λmin" in text  # the smallest class by default
    assert "40.00 / -8.000" in text and "   —  " in text


def test_bad_input_is_one_line(head_tail, tmp_path):
    with pytest.raises(SystemExit, match="is not a file"):
        head_tail.main([str(tmp_path / "missing.h5")])
    with pytest.raises(SystemExit, match=r"--watch 7: the file has classes 0, 1, 2, 3"):
        head_tail.main([str(_results(tmp_path)), "--group", "1", "--watch", "7"])
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    with pytest.raises(SystemExit, match="error: cannot read"):
        head_tail.main([str(junk)])


def test_two_files_read_as_one_and_a_paired_count(head_tail, tmp_path, capsys):
    """Run "a" in one file, run "b" (twice a's ratio, class 0 missing at epoch 20) in another."""
    paths = []
    for run, scale in (("a", 1.0), ("b", 2.0)):
        paths.append(tmp_path / f"{run}.h5")
        with ResultsWriter(paths[-1]) as w:
            for epoch in (10, 20, 30) if run == "b" else (10, 20):
                for cls in range(4):
                    if not (run == "b" and epoch == 20 and cls == 0):
                        w.write(_record(epoch, cls, 10.0 * (cls + 1), -scale * epoch * (cls + 1) / 10, run))
    out = tmp_path / "s.json"
    head_tail.main([*map(str, paths), "--group", "2", "--versus", "a", "--json", str(out)])
    summary = json.loads(out.read_text())
    assert summary["file"] == f"{paths[0]} + {paths[1]}" and sorted(summary["runs"]) == ["a", "b"]
    counts = summary["versus"]["counts"]
    assert summary["versus"]["run"] == "a" and list(counts) == ["b"]
    # epoch 30 exists only in b: not compared; at epoch 20 only the classes both runs have count
    assert counts["b"] == [{"epoch": 10, "classes": 4, "higher": 4, "higher_classes": [0, 1, 2, 3]},
                           {"epoch": 20, "classes": 3, "higher": 3, "higher_classes": [1, 2, 3]}]
    assert "10: 4/4  20: 3/3" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--versus c: runs are a, b"):
        head_tail.main([*map(str, paths), "--group", "2", "--versus", "c"])
    # reversed, no class of a is higher
    head_tail.main([*map(str, paths), "--group", "2", "--versus", "b", "--json", str(out)])
    assert [r["higher"] for r in json.loads(out.read_text())["versus"]["counts"]["a"]] == [0, 0]
