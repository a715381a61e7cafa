"""Stochastic Lanczos quadrature against dense spectra and known moments."""
import numpy as np
import pytest
import torch

import spectra
from spectra.density import default_sigma, gauss_quadrature, smooth
from spectra.lanczos import random_probes


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_weights_sum_to_one_and_density_integrates_to_one(dense_cache, probe):
    problem, dense = dense_cache("cnn")
    dens = spectra.density(problem.operator(), num_probes=3, num_steps=30, probe=probe)
    assert dens.nodes.shape == dens.weights.shape == (3, 30)
    np.testing.assert_allclose(dens.weights.sum(axis=1), 1.0, atol=1e-12)
    assert np.trapezoid(dens.values, dens.grid) == pytest.approx(1.0, abs=1e-12)
    assert np.all(dens.values >= 0)
    ev = torch.linalg.eigvalsh(dense).numpy()
    # extreme Ritz values lie inside the spectrum and close to its ends
    assert dens.nodes.min() >= ev[0] - 1e-10 and dens.nodes.max() <= ev[-1] + 1e-10
    assert dens.nodes.max() == pytest.approx(ev[-1], rel=1e-3)


def test_per_probe_quadrature_is_exact_for_low_moments(dense_cache):
    """Gauss quadrature with m nodes integrates x^j exactly for j < 2m."""
    problem, dense = dense_cache("mlp")
    H = problem.operator()
    dens = spectra.density(H, num_probes=2, num_steps=10, seed=5)
    v = random_probes(H.dim, 2, 5, "rademacher")
    v = v / v.norm(dim=0)
    for power in (1, 2, 3, 7):
        exact = torch.einsum("dp,dp->p", v, torch.linalg.matrix_power(dense, power) @ v).numpy()
        got = np.sum(dens.weights * dens.nodes ** power, axis=1)
        np.testing.assert_allclose(got, exact, rtol=1e-9, atol=1e-12)


def test_moments_agree_with_traces_within_statistical_error(dense_cache):
    problem, dense = dense_cache("cnn")
    d = dense.shape[0]
    dens = spectra.density(problem.operator(), num_probes=40, num_steps=12, seed=1)
    for power, exact in [(1, float(torch.trace(dense)) / d), (2, float(torch.trace(dense @ dense)) / d)]:
        mean, stderr = dens.moment(power)
        assert stderr > 0
        assert abs(mean - exact) <= 3 * stderr, (power, mean, exact, stderr)


def test_full_length_runs_recover_the_spectrum(dense_cache):
    problem, dense = dense_cache("cnn-layer")
    H = problem.operator()
    dens = spectra.density(H, num_probes=1, num_steps=H.dim, probe="gaussian")
    ev = torch.linalg.eigvalsh(dense).numpy()
    distinct = dens.nodes[0][dens.weights[0] > 1e-20]
    # every eigenvalue carrying weight is matched by a node
    assert np.abs(distinct[:, None] - ev[None, :]).min(axis=1).max() < 1e-8


def test_smoothing_defaults_and_custom_grid():
    nodes = np.array([[-1.0, 0.0, 2.0]])
    weights = np.array([[0.25, 0.5, 0.25]])
    sigma = default_sigma(nodes)
    assert sigma == pytest.approx(np.sqrt(3e-5))
    grid, values = smooth(nodes, weights, 0.1, np.linspace(-3, 4, 7001))
    assert np.trapezoid(values, grid) == pytest.approx(1.0)
    mean = np.trapezoid(grid * values, grid)
    assert mean == pytest.approx(0.25, abs=1e-6)
    with pytest.raises(ValueError, match="does not cover"):
        smooth(nodes, weights, 0.01, np.linspace(10, 11, 50))


def test_gauss_quadrature_of_a_known_tridiagonal():
    # Jacobi matrix of the Legendre weight on [-1, 1] (normalised): nodes are Gauss-Legendre points
    n = 5
    beta = np.array([k / np.sqrt(4 * k * k - 1) for k in range(1, n)])
    nodes, weights = gauss_quadrature(np.zeros(n), beta)
    ref_nodes, ref_weights = np.polynomial.legendre.leggauss(n)
    np.testing.assert_allclose(nodes, ref_nodes, atol=1e-13)
    np.testing.assert_allclose(weights, ref_weights / 2, atol=1e-13)


def test_bad_arguments(dense_cache):
    problem, _ = dense_cache("mlp")
    H = problem.operator()
    with pytest.raises(ValueError, match="positive"):
        spectra.density(H, num_probes=0)
    with pytest.raises(ValueError, match="probe kind"):
        spectra.density(H, probe="uniform")
    with pytest.raises(ValueError, match="sigma"):
        spectra.density(H, num_steps=4, sigma=-1.0)
    before = H.num_matvecs
    for sigma in (float("nan"), float("inf")):  # NaN once gave a density of NaNs
        with pytest.raises(ValueError, match="sigma must be a positive finite number"):
            spectra.density(H, num_steps=4, sigma=sigma)
    assert H.num_matvecs == before  # refused before any product
