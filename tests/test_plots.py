"""Figures: ratio over epochs and density render to PNG files from a store."""
from __future__ import annotations

import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure

from spectra import plots, store
from spectra.store import EigenSeries, ResultsWriter

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
    tables = {run: store.eigen_table(path, run=run) for run in store.runs(path)}
    out = tmp_path / "ratio.png"
    fig = plots.plot_ratio(tables, store.class_names(path), {0: 10, 1: 9, 2: 8}, out=out)
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
    rec = store.density_record(path, 1, 5)
    out = tmp_path / "density.png"
    fig = plots.plot_density(rec, out=out, extremes=(-1.0, 3.0))
    assert out.read_bytes()[:8] == PNG_MAGIC
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    np.testing.assert_allclose(ax.get_lines()[0].get_xdata(), rec.arrays["grid"])
    with pytest.raises(ValueError):
        plots.plot_density([])
