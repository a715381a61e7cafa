"""Extreme eigenvalues against torch.linalg.eigvalsh of dense float64 Hessians."""
import numpy as np
import pytest
import torch

import spectra
from problems import PROBLEMS
from spectra.eigenvalues import MIN_PRODUCTS


def _reference(dense):
    ev = torch.linalg.eigvalsh(dense).numpy()
    return ev, np.abs(ev).max()


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_lambda_max_and_min_to_1e8_relative(dense_cache, name):
    problem, dense = dense_cache(name)
    ev, scale = _reference(dense)
    res = spectra.eigenvalues(problem.operator(), k=1, which="both", tol=1e-10)
    assert res.converged
    assert abs(res.lambda_max - ev[-1]) <= 1e-8 * scale
    assert abs(res.lambda_min - ev[0]) <= 1e-8 * scale


@pytest.mark.parametrize("block_size", [1, 3])
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_top3_and_bottom3(dense_cache, name, block_size):
    problem, dense = dense_cache(name)
    ev, scale = _reference(dense)
    res = spectra.eigenvalues(problem.operator(), k=3, which="both", tol=1e-10, block_size=block_size)
    assert res.converged
    np.testing.assert_allclose(res.top, ev[::-1][:3], rtol=0, atol=1e-8 * scale)
    np.testing.assert_allclose(res.bottom, ev[:3], rtol=0, atol=1e-8 * scale)
    assert list(res.top) == sorted(res.top, reverse=True) and list(res.bottom) == sorted(res.bottom)


def test_reported_residuals_are_true_residuals(dense_cache):
    problem, dense = dense_cache("cnn")
    # min_products=0: stop at the first passing test, so that residuals stay measurable
    res = spectra.eigenvalues(problem.operator(), k=2, tol=1e-4, return_vectors=True, min_products=0)
    for values, vectors, residuals in [(res.top, res.top_vectors, res.top_residuals),
                                       (res.bottom, res.bottom_vectors, res.bottom_residuals)]:
        for j in range(2):
            y = vectors[:, j]
            assert float(y.norm()) == pytest.approx(1.0, abs=1e-12)
            true = float((dense @ y - values[j] * y).norm())
            assert residuals[j] == pytest.approx(true, rel=1e-6, abs=1e-14)
            assert residuals[j] <= 1e-4 * res.scale
    # a loose tolerance leaves measurable residuals: the check is not vacuous
    assert max(res.top_residuals.max(), res.bottom_residuals.max()) > 1e-9


@pytest.mark.parametrize("which", ["top", "bottom"])
def test_one_end_only(dense_cache, which):
    problem, dense = dense_cache("mlp")
    ev, scale = _reference(dense)
    res = spectra.eigenvalues(problem.operator(), k=2, which=which, tol=1e-10)
    if which == "top":
        assert len(res.bottom) == 0
        np.testing.assert_allclose(res.top, ev[::-1][:2], atol=1e-8 * scale, rtol=0)
    else:
        assert len(res.top) == 0
        np.testing.assert_allclose(res.bottom, ev[:2], atol=1e-8 * scale, rtol=0)


def test_thick_restart_with_a_small_basis(dense_cache):
    problem, dense = dense_cache("cnn")
    ev, scale = _reference(dense)
    res = spectra.eigenvalues(problem.operator(), k=2, tol=1e-9, max_basis=16, max_iter=2000)
    assert res.num_restarts > 0 and res.converged
    np.testing.assert_allclose(res.top, ev[::-1][:2], atol=1e-8 * scale, rtol=0)
    np.testing.assert_allclose(res.bottom, ev[:2], atol=1e-8 * scale, rtol=0)


def test_deterministic_for_a_seed_and_counts_products(dense_cache):
    problem, _ = dense_cache("cnn")
    H = problem.operator()
    a = spectra.eigenvalues(H, tol=1e-6, seed=4)
    b = spectra.eigenvalues(problem.operator(), tol=1e-6, seed=4)
    assert np.array_equal(a.top, b.top) and np.array_equal(a.bottom, b.bottom)
    assert a.num_matvecs == b.num_matvecs == H.num_matvecs
    assert a.num_matvecs < H.dim  # converged long before the full space


def _bulk_spectrum(dim: int = 100_000) -> torch.Tensor:
    """A Hessian-like spectrum: 3 outliers, a continuous negative and positive
    edge (300 eigenvalues each), and a wide near-null bulk."""
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.tensor([112.0, 30.0, 10.0], dtype=torch.float64),
                      -torch.rand(300, generator=g, dtype=torch.float64) ** 2,
                      3 * torch.rand(300, generator=g, dtype=torch.float64) ** 2,
                      1e-3 * torch.randn(dim - 603, generator=g, dtype=torch.float64)])


class _Diagonal:
    """diag(ev) as an operator (a random start makes the basis irrelevant)."""

    def __init__(self, ev: torch.Tensor) -> None:
        self.ev, self.dim, self.device = ev, len(ev), torch.device("cpu")

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        return self.ev[:, None] * v


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_bulk_mixture_is_not_reported_as_lambda_min(seed):
    """A small Krylov space's lowest Ritz pair mixes bulk directions: Rayleigh quotient ≈ 0
    and residual below tol·λmax (seen on a ResNet-32 class at tol 1e-3: λmin −0.0008
    "converged" after 3 products, true −1.081). Without the product floor the same
    happens here; with it λmin is found within the stopping rule's bound."""
    ev = _bulk_spectrum()
    true_min, scale = float(ev.min()), float(ev.abs().max())
    trapped = spectra.eigenvalues(_Diagonal(ev), tol=1e-3, seed=seed, min_products=0)
    assert trapped.converged and abs(trapped.lambda_min) < 0.01  # the failure the floor prevents
    res = spectra.eigenvalues(_Diagonal(ev), tol=1e-3, seed=seed)
    assert res.converged and res.num_matvecs >= MIN_PRODUCTS
    assert abs(res.lambda_min - true_min) <= 1e-3 * scale and res.lambda_min < 0.95 * true_min
    assert abs(res.lambda_max - 112.0) <= 1e-3 * scale


def test_fewer_products_than_the_floor_are_never_converged():
    res = spectra.eigenvalues(_Diagonal(_bulk_spectrum(2_000)), tol=0.5, max_iter=6)
    assert res.num_matvecs <= 8 and not res.converged


def test_iteration_budget_reports_non_convergence(dense_cache):
    problem, _ = dense_cache("cnn")
    res = spectra.eigenvalues(problem.operator(), tol=1e-12, max_iter=5)
    assert not res.converged and res.num_iterations == 5


def test_full_space_on_a_tiny_matrix_is_exact():
    a = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = a + a.T

    class Dense:
        dim, device = 6, torch.device("cpu")

        def matmul(self, v):
            return a @ v

    ev = torch.linalg.eigvalsh(a).numpy()
    res = spectra.eigenvalues(Dense(), k=3, tol=1e-14, block_size=4)
    np.testing.assert_allclose(res.bottom, ev[:3], atol=1e-12)
    np.testing.assert_allclose(res.top, ev[::-1][:3], atol=1e-12)
    res = spectra.eigenvalues(Dense(), k=(4, 2), tol=1e-14)  # unequal ends that together fill the space
    np.testing.assert_allclose(res.top, ev[::-1][:4], atol=1e-12)
    np.testing.assert_allclose(res.bottom, ev[:2], atol=1e-12)
    assert res.converged


def test_bad_arguments(dense_cache):
    problem, _ = dense_cache("mlp")
    H = problem.operator()
    for kwargs, msg in [({"which": "middle"}, "which"), ({"k": 0}, "positive"), ({"tol": 0}, "tol"),
                        ({"tol": float("nan")}, "tol"), ({"tol": 2.0}, "tol"), ({"k": 1.5}, "integer"),
                        ({"k": (1, 2), "which": "top"}, "pair"), ({"max_iter": 10.0}, "max_iter")]:
        with pytest.raises(ValueError, match=msg) as info:
            spectra.eigenvalues(H, **kwargs)
        assert "\n" not in str(info.value)


class _Dense:
    """A small symmetric matrix as an operator."""

    def __init__(self, dim: int) -> None:
        a = torch.randn(dim, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(dim))
        self.a, self.dim, self.device = a + a.T, dim, torch.device("cpu")

    def matmul(self, v):
        return self.a @ v


@pytest.mark.parametrize("k, which", [(11, "top"), (11, "bottom"), (6, "both"), ((8, 3), "both")])
def test_more_eigenvalues_than_the_dimension_are_refused(k, which):
    """Once clipped silently: k=11 on a 10-dim H gave 10 values, 6+6 gave overlapping ends."""
    with pytest.raises(ValueError, match=r"asked for, but the operator has only 10$|would share"):
        spectra.eigenvalues(_Dense(10), k=k, which=which)


def test_ends_sharing_ritz_pairs_are_never_converged():
    """max_iter below top + bottom: the basis is too small for distinct ends."""
    res = spectra.eigenvalues(_Dense(10), k=3, which="both", max_iter=4, min_products=0, tol=0.999)
    assert len(np.intersect1d(res.top, res.bottom)) > 0 or len(res.top) < 3
    assert not res.converged


def test_hvp_count_for_the_cnn_to_1e6(dense_cache, capsys):
    """Records how many products λmax and λmin need to 1e-6 relative residual."""
    problem, dense = dense_cache("cnn")
    ev, scale = _reference(dense)
    res = spectra.eigenvalues(problem.operator(), tol=1e-6)
    assert res.converged and res.num_matvecs <= 80
    assert abs(res.lambda_max - ev[-1]) <= 1e-8 * scale and abs(res.lambda_min - ev[0]) <= 1e-8 * scale
    with capsys.disabled():
        print(f"\n[cnn d={problem.operator().dim}] tol 1e-6: {res.num_matvecs} HVPs "
              f"({res.num_iterations} Lanczos + 2 check), residuals {res.top_residuals[0]:.1e}/{res.bottom_residuals[0]:.1e}")


def test_float32_keeps_iterating_until_measured_residuals_meet_tol(dense_cache):
    problem, dense = dense_cache("cnn")
    ev, scale = _reference(dense)
    res = spectra.eigenvalues(problem.operator(dtype=torch.float32), k=2, tol=1e-5)
    assert res.converged
    assert max(res.top_residuals.max(), res.bottom_residuals.max()) <= 1e-5 * res.scale
    np.testing.assert_allclose(res.top, ev[::-1][:2], atol=1e-5 * scale, rtol=0)
    np.testing.assert_allclose(res.bottom, ev[:2], atol=1e-5 * scale, rtol=0)


def test_an_invariant_start_space_does_not_stop_before_k_values_per_end():
    """Start vector = the eigenvector of a rank-1 H: the first Ritz pair is exact,
    but k=2 per end needs 4 basis vectors, else top and bottom share the one pair."""
    from spectra.lanczos import random_probes

    u = random_probes(10, 1, 0, "gaussian", torch.device("cpu"))  # eigenvalues() draws this start
    a = 3.0 * (u @ u.T) / float(u.norm()) ** 2

    class Dense:
        dim, device = 10, torch.device("cpu")

        def matmul(self, v):
            return a @ v

    res = spectra.eigenvalues(Dense(), k=2, which="both", tol=1e-8)
    assert res.converged and len(res.top) == 2 and len(res.bottom) == 2
    np.testing.assert_allclose(res.top, [3.0, 0.0], atol=1e-10)
    np.testing.assert_allclose(res.bottom, [0.0, 0.0], atol=1e-10)


@pytest.mark.parametrize("max_iter", [18, 20, 22])
def test_max_iter_bounds_everything_but_the_final_check(dense_cache, max_iter):
    """float32 misses tol 1e-8, so failed intermediate checks happen; their products
    count against max_iter, and only the final check (2 products, k=1) comes on top."""
    problem, _ = dense_cache("cnn")
    H = problem.operator(dtype=torch.float32)
    res = spectra.eigenvalues(H, k=1, tol=1e-8, max_iter=max_iter)
    assert not res.converged
    assert res.num_matvecs == H.num_matvecs <= max_iter + 2
