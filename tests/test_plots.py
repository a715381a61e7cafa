"""Figures: ratio over epochs and density render to PNG files from a store."""
from __future__ import annotations

import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure

from spectra import plots, results_query
from spectra.results_query import EigenSeries
from spectra.store import ResultsWriter

from test_store import make_record

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_pixels(path):
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_saddle_ratio_and_order():
    s = EigenSeries(np.array([1, 2]), np.array([2.0, -4.0]), np.array([-1.0, -1.0]))
    np.testing.assert_allclose(plots.saddle_ratio(s), [0.5, 0.25])
    assert plots.head_to_tail_order([0, 1, 2], {0: 5, 1: 50, 2: 50}) == [1, 2, 0]
    assert plots.head_to_tail_order([2, 0], None) == [0, 2]


def test_ratio_plot_png_from_store(tmp_path):
    path = tmp_path / "r.h5"
    with ResultsWriter(path) as w:
        for run, gain in (("ce-drw", 1.0), ("ce-drw-sam", 0.2)):
            for epoch in (10, 20, 30):
                for c in range(3):
                    w.write(make_record(epoch, c, 10.0, -gain * c * epoch / 30, run=run))
    tables = {run: results_query.eigen_table(path, run=run) for run in results_query.runs(path)}
    out = tmp_path / "ratio.png"
    fig = plots.plot_ratio(tables, results_query.class_names(path), {0: 10, 1: 9, 2: 8}, out=out)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert out.read_bytes()[:8] == PNG_MAGIC
    # Line data are the stored ratios, tail (class 2) drawn red, head blue.
    ax = fig.axes[0]
    lines = {line.get_label().split(":")[0]: line for line in ax.get_lines()}
    np.testing.assert_allclose(lines["2"].get_ydata(), [2 / 30, 4 / 30, 6 / 30])
    assert lines["2"].get_color()[0] > lines["2"].get_color()[2]
    assert lines["0"].get_color()[2] > lines["0"].get_color()[0]
    assert _png_pixels(out).std() > 10  # not a blank image
    assert matplotlib.get_backend()  # pyplot state untouched: no exception, nothing switched


def test_ratio_plot_many_classes_uses_colorbar(tmp_path):
    tables = {"run": {c: EigenSeries(np.array([1, 2]), np.array([1.0, 1.0]), np.array([-0.01 * c - 1e-4, -0.1]))
                      for c in range(20)}}
    fig = plots.plot_ratio(tables, out=tmp_path / "many.png")
    assert fig.axes[0].get_yscale() == "log"
    assert len(fig.axes) == 2  # the panel and its colour bar


def test_density_plot_png(tmp_path):
    path = tmp_path / "r.h5"
    with ResultsWriter(path) as w:
        w.write(make_record(5, 1, 3.0, -1.0, kind="density"))
    rec = results_query.density_record(path, 1, 5)
    out = tmp_path / "density.png"
    fig = plots.plot_density(rec, out=out, extremes=(-1.0, 3.0))
    assert out.read_bytes()[:8] == PNG_MAGIC
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    np.testing.assert_allclose(ax.get_lines()[0].get_xdata(), rec.arrays["grid"])
    with pytest.raises(ValueError):
        plots.plot_density([])


# ------------------------------------------------------------------ missing ends, output paths, several classes
def test_ratio_plot_leaves_gaps_and_notes_where_an_end_is_missing(tmp_path):
    nan = np.nan
    tables = {"ce-drw": {
        0: EigenSeries(np.array([1, 2, 3]), np.array([2.0, 2.0, 2.0]), np.array([-1.0, nan, -0.5])),
        1: EigenSeries(np.array([1, 2]), np.array([nan, nan]), np.array([-1.0, -1.0])),
    }}
    notes = plots.missing_extremes(tables, {0: "plane", 1: "car"})
    assert notes == ["ce-drw class 0 (plane): no λmin at epoch 2 (stored with bottom-k 0)",
                     "ce-drw class 1 (car): no λmax at all epochs (stored with top-k 0)"]
    fig = plots.plot_ratio(tables, {0: "plane", 1: "car"}, out=tmp_path / "gaps.png")
    (line,) = fig.axes[0].get_lines()  # class 1 has no complete epoch: no line
    assert line.get_label().startswith("0:")
    np.testing.assert_allclose(line.get_ydata(), [0.5, nan, 0.25])
    assert fig.texts[-1].get_text() == "\n".join(notes)  # the footnote names what is missing
    with pytest.raises(ValueError, match="no eigs entry holds both λmin and λmax"):
        plots.plot_ratio({"r": {1: tables["ce-drw"][1]}})


def test_image_path_is_checked_before_plotting(tmp_path):
    assert plots.image_path(tmp_path / "noext") == tmp_path / "noext.png"
    assert plots.image_path(tmp_path / "fig.PDF") == tmp_path / "fig.PDF"
    with pytest.raises(ValueError, match=r"cannot write a \.xyz image .* use one of .*\.png"):
        plots.image_path(tmp_path / "fig.xyz")
    with pytest.raises(ValueError, match="folder .*missing of the output image does not exist"):
        plots.image_path(tmp_path / "missing" / "fig.png")
    fig = plots.plot_ratio({"r": {0: EigenSeries(np.array([1]), np.array([2.0]), np.array([-1.0]))}})
    written = plots.save_figure(fig, tmp_path / "noext")
    assert written == tmp_path / "noext.png" and written.read_bytes()[:8] == PNG_MAGIC


def test_density_plot_several_classes_and_one_missing_extreme(tmp_path):
    recs = [make_record(5, c, 3.0, -1.0, kind="density") for c in (0, 2)]
    fig = plots.plot_density(recs, labels=["a", "b"], extremes=(np.nan, 3.0))
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()][:3] == ["a", "b", r"$\lambda_{\max}$ = 3"]
    assert len(ax.get_lines()) == 4  # two curves, λmax, the zero line; no NaN λmin line
    assert ax.get_title() == "Hessian spectral density — classes 0, 2"
    with pytest.raises(ValueError, match="1 labels for 2 density entries"):
        plots.plot_density(recs, labels=["a"])


# ------------------------------------------------------------------ the `spectra plot` commands on such files
def _cli(*args):
    from click.testing import CliRunner

    from spectra_cli.main import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _one_error_line(result, pattern):
    import re

    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("Error:")]
    assert re.search(pattern, line), line


@pytest.fixture
def captured_plots(monkeypatch):
    """What the commands hand to plot_ratio / plot_density (then drawn for real)."""
    import spectra_cli.plot as cli_plot

    calls: dict[str, list] = {"ratio": [], "density": []}

    def spy(name, real):
        def wrapper(*args, **kwargs):
            fig = real(*args, **kwargs)
            calls[name].append((args, kwargs, fig))
            return fig
        return wrapper

    monkeypatch.setattr(cli_plot, "plot_ratio", spy("ratio", plots.plot_ratio))
    monkeypatch.setattr(cli_plot, "plot_density", spy("density", plots.plot_density))
    return calls


def test_cli_density_only_file(tmp_path, captured_plots):
    path = tmp_path / "d.h5"
    with ResultsWriter(path) as w:
        w.write(make_record(3, 2, 3.0, -1.0, kind="density", run="ce-drw"))
        w.write(make_record(3, 0, 5.0, -2.0, kind="density", run="ce-drw"))
    res = _cli("plot", "density", path, "--class", "2", "--epoch", "3", "-o", tmp_path / "d.png")
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == f"wrote {tmp_path / 'd.png'}"
    assert captured_plots["density"][-1][1]["extremes"] is None
    _one_error_line(_cli("plot", "ratio", path, "-o", tmp_path / "r.png"),
                    r"d\.h5 holds no eigenvalue \(eigs\) entries \(it holds: density\)")
    # Several classes: one curve each; 'all' = the classes with density entries at that epoch.
    for spec in ("0,2", "all"):
        res = _cli("plot", "density", path, "--class", spec, "--epoch", "3", "-o", tmp_path / "two.png")
        assert res.exit_code == 0, res.output
        args, kwargs, fig = captured_plots["density"][-1]
        assert sorted(r.class_index for r in args[0]) == [0, 2] and kwargs["extremes"] is None
    _one_error_line(_cli("plot", "density", path, "--class", "1", "--epoch", "3", "-o", tmp_path / "x.png"),
                    r"no density entry for class 1 at epoch 3")
    eigs_only, empty = tmp_path / "e.h5", tmp_path / "empty.h5"
    with ResultsWriter(eigs_only) as w:
        w.write(make_record(3, 2, 3.0, -1.0, run="ce-drw"))
    ResultsWriter(empty).close()  # e.g. a sweep whose only job failed
    for f, held in ((eigs_only, "eigs"), (empty, "nothing")):
        _one_error_line(_cli("plot", "density", f, "--class", "9", "--epoch", "1", "-o", tmp_path / "x.png"),
                        rf"holds no density entries \(it holds: {held}\)")


def test_cli_density_overlays_runs(tmp_path, captured_plots):
    """The paper's comparison: one class at one epoch, CE+DRW against CE+DRW+SAM, in one figure."""
    path = tmp_path / "d.h5"
    with ResultsWriter(path) as w:
        for run, top in (("ce-drw", 9.0), ("ce-drw-sam", 4.0)):
            w.write(make_record(200, 2, top, -1.0, kind="density", run=run))
            w.write(make_record(200, 2, top, -1.0, kind="eigs", run=run))
    res = _cli("plot", "density", path, "--class", "2", "--epoch", "200", "--run", "ce-drw", "--run", "ce-drw-sam",
               "-o", tmp_path / "d.png")
    assert res.exit_code == 0, res.output
    args, kwargs, _ = captured_plots["density"][-1]
    assert [r.run for r in args[0]] == ["ce-drw", "ce-drw-sam"] and [r.arrays["grid"][-1] for r in args[0]] == [9.0, 4.0]
    assert kwargs["labels"][0].startswith("ce-drw epoch 200") and kwargs["extremes"] is None  # two runs: no single λ pair
    with ResultsWriter(path) as w:  # class 0 in one run only: `--class all` means the classes both runs have
        w.write(make_record(200, 0, 7.0, -1.0, kind="density", run="ce-drw"))
    res = _cli("plot", "density", path, "--class", "all", "--epoch", "200", "--run", "ce-drw", "--run", "ce-drw-sam",
               "-o", tmp_path / "all.png")
    assert res.exit_code == 0, res.output
    assert [(r.run, r.class_index) for r in captured_plots["density"][-1][0][0]] == [("ce-drw", 2), ("ce-drw-sam", 2)]
    res = _cli("plot", "density", path, "--class", "all", "--epoch", "200", "--run", "ce-drw", "-o", tmp_path / "one.png")
    assert sorted(r.class_index for r in captured_plots["density"][-1][0][0]) == [0, 2]
    res = _cli("plot", "density", path, "--class", "2", "--epoch", "200", "--run", "ce-drw", "--run", "ce-drw",
               "-o", tmp_path / "d.png")
    assert res.exit_code == 0 and [r.run for r in captured_plots["density"][-1][0][0]] == ["ce-drw"]
    _one_error_line(_cli("plot", "density", path, "--class", "2", "--epoch", "200", "--run", "ce-drw", "--run", "vs",
                         "-o", tmp_path / "x.png"), r"vs")


def test_cli_ratio_with_missing_ends_and_output_paths(tmp_path, captured_plots):
    path = tmp_path / "e.h5"
    with ResultsWriter(path) as w:
        w.write(make_record(1, 0, 4.0, np.nan, run="ce-drw"))
        w.write(make_record(2, 0, 4.0, -2.0, run="ce-drw"))
        w.write(make_record(1, 1, np.nan, -2.0, run="ce-drw"))
        w.write(make_record(1, 1, 4.0, np.nan, run="ce-drw", kind="density"))
    res = _cli("plot", "ratio", path, "-o", tmp_path / "noext")
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == f"wrote {tmp_path / 'noext.png'}"
    assert (tmp_path / "noext.png").read_bytes()[:8] == PNG_MAGIC
    assert "note: ce-drw class 0 (c0): no λmin at epoch 1 (stored with bottom-k 0)" in res.stderr
    assert "note: ce-drw class 1 (c1): no λmax at all epochs (stored with top-k 0)" in res.stderr
    _one_error_line(_cli("plot", "ratio", path, "-o", tmp_path / "nodir" / "r.png"),
                    r"folder .*nodir of the output image does not exist")
    _one_error_line(_cli("plot", "ratio", path, "-o", tmp_path / "r.bmpx"), r"cannot write a \.bmpx image")
    assert not list(tmp_path.glob("r.*"))
    # The density of class 1 at epoch 1 gets the one stored end (λmin) and a NaN for λmax.
    res = _cli("plot", "density", path, "--class", "1", "--epoch", "1", "-o", tmp_path / "d.svg")
    assert res.exit_code == 0, res.output
    lam_min, lam_max = captured_plots["density"][-1][1]["extremes"]
    assert lam_min == -2.0 and np.isnan(lam_max)


def test_cli_runs_with_one_name_in_two_folders(tmp_path, captured_plots):
    path = tmp_path / "r.h5"
    with ResultsWriter(path) as w:
        for seed, gain in (("seedA", 1.0), ("seedB", 3.0)):
            for epoch in (1, 2):
                w.write(make_record(epoch, 0, 10.0, -gain, run="ce-drw", parent=f"/exp/{seed}"))
            w.write(make_record(2, 0, 10.0, -gain, run="ce-drw", kind="density", parent=f"/exp/{seed}"))
    res = _cli("plot", "ratio", path, "-o", tmp_path / "all.png")
    assert res.exit_code == 0, res.output
    tables = captured_plots["ratio"][-1][0][0]
    assert list(tables) == ["seedA/ce-drw", "seedB/ce-drw"]
    np.testing.assert_allclose(tables["seedB/ce-drw"][0].lambda_min, [-3.0, -3.0])
    assert [ax.get_title() for ax in captured_plots["ratio"][-1][2].axes[:2]] == ["seedA/ce-drw", "seedB/ce-drw"]
    _one_error_line(_cli("plot", "ratio", path, "--run", "ce-drw", "-o", tmp_path / "x.png"),
                    r"run 'ce-drw' is ambiguous .*: it matches seedA/ce-drw, seedB/ce-drw")
    res = _cli("plot", "ratio", path, "--run", "/exp/seedB/ce-drw", "--run", "seedB/ce-drw", "-o", tmp_path / "b.png")
    assert res.exit_code == 0, res.output
    assert list(captured_plots["ratio"][-1][0][0]) == ["seedB/ce-drw"]
    _one_error_line(_cli("plot", "density", path, "--class", "0", "--epoch", "2", "-o", tmp_path / "d.png"),
                    r"several runs \(seedA/ce-drw, seedB/ce-drw\)")
    res = _cli("plot", "density", path, "--class", "0", "--epoch", "2", "--run", "seedA/ce-drw",
               "-o", tmp_path / "d.png")
    assert res.exit_code == 0, res.output
    args, kwargs, _ = captured_plots["density"][-1]
    assert kwargs["labels"] == ["seedA/ce-drw epoch 2, class 0 (c0)"]
    assert kwargs["extremes"] == (-1.0, 10.0)  # from seedA's eigs entry, not seedB's



def test_cli_plots_read_several_results_files(tmp_path, captured_plots):
    """`spectra plot ratio runs/ce-drw/results.h5 runs/ce-drw-sam/results.h5`: each training run's
    `--spectra-every` file, side by side without a second pass."""
    files = []
    for run, lam_min in (("ce-drw", -1.0), ("ce-drw-sam", -3.0)):
        files.append(tmp_path / f"{run}.h5")
        with ResultsWriter(files[-1]) as w:
            for epoch in (1, 5):
                w.write(make_record(epoch, 0, 10.0, lam_min, run=run))
            w.write(make_record(5, 0, 10.0, lam_min, run=run, kind="density"))
    res = _cli("plot", "ratio", *files, "-o", tmp_path / "r.png")
    assert res.exit_code == 0, res.output
    args, _, fig = captured_plots["ratio"][-1]
    assert list(args[0]) == ["ce-drw", "ce-drw-sam"]
    np.testing.assert_allclose(args[0]["ce-drw-sam"][0].lambda_min, [-3.0, -3.0])
    assert [ax.get_title() for ax in fig.axes[:2]] == ["ce-drw", "ce-drw-sam"]
    res = _cli("plot", "ratio", *files, "--run", "ce-drw-sam", "-o", tmp_path / "one.png")
    assert res.exit_code == 0 and list(captured_plots["ratio"][-1][0][0]) == ["ce-drw-sam"]
    res = _cli("plot", "density", *files, "--class", "0", "--epoch", "5", "--run", "ce-drw", "--run", "ce-drw-sam",
               "-o", tmp_path / "d.png")
    assert res.exit_code == 0, res.output
    assert [r.run for r in captured_plots["density"][-1][0][0]] == ["ce-drw", "ce-drw-sam"]
    _one_error_line(_cli("plot", "ratio", files[0], tmp_path / "nope.h5", "-o", tmp_path / "x.png"),
                    r"results file not found: .*nope\.h5")
    # A run folder stands for its results.h5 (where `spectra train --spectra-every` writes).
    for f in files:
        (tmp_path / f.stem).mkdir()
        f.rename(tmp_path / f.stem / "results.h5")
    res = _cli("plot", "ratio", tmp_path / "ce-drw", tmp_path / "ce-drw-sam" / "results.h5", "-o", tmp_path / "r.png")
    assert res.exit_code == 0, res.output
    assert list(captured_plots["ratio"][-1][0][0]) == ["ce-drw", "ce-drw-sam"]
    _one_error_line(_cli("plot", "ratio", tmp_path, "-o", tmp_path / "x.png"),
                    r"is a folder without results\.h5 \(train with --spectra-every N, or give a results file\)")
    assert _cli("plot", "ratio", "-o", tmp_path / "x.png").exit_code == 2  # no file: a usage error

def test_cli_density_marks_extremes_only_from_eigs_of_the_same_hessian(tmp_path, captured_plots):
    """An eigs entry of the same run, epoch and class but another Hessian (other params, dtype,
    loss, samples or checkpoint) once put its λmin/λmax on the density."""
    path = tmp_path / "m.h5"
    variants = {"params": ["linear.bias"], "dtype": "float64", "loss_fn": "ldam",
                "sample_indices_sha256": "1" * 64, "checkpoint_sha256": "f" * 64}
    with ResultsWriter(path) as w:
        w.write(make_record(3, 2, 3.0, -1.0, kind="density", run="ce-drw"))
        for i, (name, value) in enumerate(variants.items()):
            other = make_record(3, 2, 0.15 + i, 5e-9, run="ce-drw", settings=f"{i}" * 64)
            other.provenance[name] = value
            w.write(other)

    def drawn() -> tuple[float, float] | None:
        res = _cli("plot", "density", path, "--class", "2", "--epoch", "3", "-o", tmp_path / "d.png")
        assert res.exit_code == 0, res.output
        return captured_plots["density"][-1][1]["extremes"]

    assert drawn() is None
    with ResultsWriter(path) as w:
        w.write(make_record(3, 2, 7.0, -2.0, run="ce-drw", settings="s" * 64))
    assert drawn() == (-2.0, 7.0)


def test_a_ratio_panel_of_one_epoch_has_whole_epoch_ticks():
    """matplotlib's integer locator falls back to 0.945, 0.96, ... when a panel spans a single epoch."""
    fig = plots.plot_ratio({"run": {0: EigenSeries(np.array([200]), np.array([5.0]), np.array([-0.5]))}}, {0: "a"}, {0: 10})
    ticks = [t for t in fig.axes[0].get_xticks() if 199 <= t <= 201]
    assert ticks and all(float(t).is_integer() for t in ticks) and 200 in ticks


def test_cli_ratio_says_when_it_mixes_settings(tmp_path, captured_plots):
    """A re-sweep of one run on the test split beside another run's train-split entries: plotted, with a note."""
    path = tmp_path / "mixed.h5"
    with ResultsWriter(path) as w:
        w.write(make_record(1, 0, 10.0, -1.0, run="ce-drw-sam"))
        test_split = make_record(1, 0, 10.0, -2.0, run="ce-drw", settings="t" * 64)
        test_split.provenance["split"] = "test"
        w.write(test_split)
    res = _cli("plot", "ratio", path, "-o", tmp_path / "r.png")
    assert res.exit_code == 0, res.output
    assert "note: the figure mixes entries computed with different settings (split)" in res.stderr
    only_cap = make_record(5, 0, 10.0, -1.0, run="ce-drw-sam", settings="c" * 64)  # same fields, other hash
    with ResultsWriter(path) as w:
        w.write(only_cap)
    res = _cli("plot", "ratio", path, "--run", "ce-drw-sam", "-o", tmp_path / "r.png")
    assert "(per-class sample cap (--max-samples))" in res.stderr
    res = _cli("plot", "ratio", path, "--run", "ce-drw", "-o", tmp_path / "r.png")
    assert res.exit_code == 0 and "note" not in res.stderr
