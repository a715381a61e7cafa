"""Hutchinson and Hutch++ against dense traces."""
import numpy as np
import pytest
import torch

import spectra


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_within_three_standard_errors(dense_cache, name, method):
    problem, dense = dense_cache(name)
    tr = spectra.trace(problem.operator(), num_probes=60, method=method, seed=2)
    exact = float(torch.trace(dense))
    assert tr.stderr > 0 and tr.num_matvecs == 60
    assert abs(tr.estimate - exact) <= 3 * tr.stderr, (tr, exact)


def test_hutchpp_is_exact_when_the_sketch_spans_the_space():
    a = torch.randn(12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = a @ a.T

    class Dense:
        dim, device = 12, torch.device("cpu")

        def matmul(self, v):
            return a @ v

    tr = spectra.trace(Dense(), num_probes=39, method="hutch++")
    assert tr.estimate == pytest.approx(float(torch.trace(a)), rel=1e-10)


def test_hutchpp_has_lower_error_on_a_decaying_spectrum():
    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(300, 300, dtype=torch.float64, generator=gen))
    a = q @ torch.diag(1.0 / torch.arange(1, 301, dtype=torch.float64) ** 2) @ q.T

    class Dense:
        dim, device = 300, torch.device("cpu")

        def matmul(self, v):
            return a @ v

    plain = spectra.trace(Dense(), num_probes=60, method="hutchinson")
    better = spectra.trace(Dense(), num_probes=60, method="hutch++")
    assert better.stderr < plain.stderr / 5


def test_bad_arguments(dense_cache):
    problem, _ = dense_cache("mlp")
    H = problem.operator()
    with pytest.raises(ValueError, match="unknown trace method"):
        spectra.trace(H, method="exact")
    with pytest.raises(ValueError, match="at least 4"):
        spectra.trace(H, num_probes=3)
    with pytest.raises(ValueError, match="at least 2"):
        spectra.trace(H, num_probes=1, method="hutchinson")


def test_progress_bar_counts_every_product(dense_cache, capsys, monkeypatch):
    import importlib

    trace_module = importlib.import_module("spectra.trace")  # spectra.trace is the function
    real, bars = trace_module.progress_bar, []

    def recording_bar(*args, **kwargs):
        bars.append(real(*args, **kwargs))
        return bars[-1]

    monkeypatch.setattr(trace_module, "progress_bar", recording_bar)
    problem, _ = dense_cache("mlp")
    quiet, shown = problem.operator(), problem.operator()
    a = spectra.trace(quiet, num_probes=25, method="hutch++", seed=3)
    b = spectra.trace(shown, num_probes=25, method="hutch++", seed=3, progress=True)
    assert "trace:   0%" in capsys.readouterr().err  # on stderr, with its total from the start
    assert bars[0].n == 0 and bars[1].total == bars[1].n == 25  # quiet: a no-op bar; shown: a step per product
    assert a.estimate == b.estimate and quiet.num_matvecs == shown.num_matvecs == 25


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_min_probes_is_the_exact_minimum(dense_cache, method):
    """MIN_PROBES (which the CLI checks options against) is what trace() accepts,
    and the least that gives a finite standard error (hutch++ with 3 gave NaN)."""
    from spectra.trace import MIN_PROBES

    problem, _ = dense_cache("mlp")
    least = MIN_PROBES[method]
    result = spectra.trace(problem.operator(), num_probes=least, method=method)
    assert result.num_matvecs == least and np.isfinite(result.stderr) and result.stderr > 0
    with pytest.raises(ValueError, match=f"at least {least}"):
        spectra.trace(problem.operator(), num_probes=least - 1, method=method)
