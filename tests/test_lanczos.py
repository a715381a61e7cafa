"""The Lanczos core: probes, orthogonalisation, tridiagonal runs."""
import numpy as np
import pytest
import torch

from spectra.lanczos import lanczos_tridiagonal, orthogonalize, orthonormal_columns, random_probes


def test_probes_are_seeded_and_of_the_right_kind():
    a = random_probes(50, 3, seed=1)
    assert a.shape == (50, 3) and a.dtype == torch.float64
    assert torch.equal(a, random_probes(50, 3, seed=1))
    assert not torch.equal(a, random_probes(50, 3, seed=2))
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    g = random_probes(2000, 1, seed=0, kind="gaussian")
    assert abs(float(g.std()) - 1) < 0.05
    with pytest.raises(ValueError):
        random_probes(5, 1, 0, kind="sobol")


def test_orthogonalize_twice_is_enough():
    q, _ = torch.linalg.qr(torch.randn(100, 10, dtype=torch.float64))
    w = q @ torch.randn(10, 2, dtype=torch.float64) * 1e8 + 1e-3 * torch.randn(100, 2, dtype=torch.float64)
    orthogonalize(w, q)
    assert float((q.T @ w).abs().max()) < 1e-12 * float(w.norm())


def test_breakdown_is_replaced_by_a_fresh_orthogonal_direction():
    q, _ = torch.linalg.qr(torch.randn(30, 4, dtype=torch.float64))
    w = torch.zeros(30, 2, dtype=torch.float64)
    w[:, 0] = torch.randn(30, dtype=torch.float64)
    orthogonalize(w, q)  # column 1 is exactly zero: an invariant subspace
    nq, r = orthonormal_columns(w, q, seed=0)
    full = torch.cat([q, nq], dim=1)
    torch.testing.assert_close(full.T @ full, torch.eye(6, dtype=torch.float64), atol=1e-12, rtol=0)
    assert float(r[1].abs().max()) == 0.0
    torch.testing.assert_close(nq @ r, w, atol=1e-12, rtol=0)


def test_tridiagonal_runs_match_the_spectrum_and_stop_on_invariance():
    diag = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0] * 4, dtype=torch.float64)  # 5 distinct values

    def matvec(v):
        return diag[:, None] * v

    start = random_probes(20, 2, seed=0)
    tri = lanczos_tridiagonal(matvec, start, num_steps=12)
    assert list(tri.steps) == [5, 5]  # the Krylov space is invariant after 5 steps
    for p in range(2):
        np.testing.assert_allclose(np.linalg.eigvalsh(tri.matrix(p)), [1, 2, 3, 4, 5], atol=1e-12)
