"""Cross-checks against PyHessian 0.1 and curvlinops (optional `compare` extra).

PyHessian's ``eigenvalues()`` is power iteration: it returns the eigenvalue
of largest *magnitude* and stops on a 1e-3 relative change. It is a fair
check of λmax only when λmax > |λmin|; these tests document both sides.
"""
import numpy as np
import pytest
import torch

import spectra
from problems import cnn_problem

pyhessian = pytest.importorskip("pyhessian", reason="PyHessian (compare extra) not installed")


def _pyhessian_top(problem, loss_fn):
    model = problem.model.float()
    x = torch.cat([b[0] for b in problem.batches]).float()
    y = torch.cat([b[1] for b in problem.batches])
    torch.manual_seed(0)
    values, _ = pyhessian.hessian(model, loss_fn, data=(x, y), cuda=False).eigenvalues(
        maxIter=100, tol=1e-3, top_n=1)
    return values[0]


def _ours(loss_fn):
    problem = cnn_problem()
    H = spectra.HessianOperator(problem.model, loss_fn, problem.batches)
    return spectra.eigenvalues(H, tol=1e-10)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_pyhessian_agrees_on_lambda_max_when_it_dominates():
    problem = cnn_problem()
    ours = _ours(problem.loss_fn)
    assert ours.lambda_max > abs(ours.lambda_min)  # the case where power iteration is meaningful
    theirs = _pyhessian_top(problem, problem.loss_fn)
    assert theirs == pytest.approx(ours.lambda_max, rel=2e-2)
    assert abs(theirs - ours.lambda_max) > 1e-6 * ours.lambda_max  # it stops early, we do not


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_pyhessian_returns_lambda_min_when_negative_curvature_dominates():
    problem = cnn_problem()

    def negated(outputs, targets):  # H -> -H: now |λmin| > λmax
        return -problem.loss_fn(outputs, targets)

    ours = _ours(negated)
    assert abs(ours.lambda_min) > ours.lambda_max > 0
    theirs = _pyhessian_top(problem, negated)
    assert theirs < 0  # not λmax at all
    assert theirs == pytest.approx(ours.lambda_min, rel=2e-2)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_pyhessian_density_is_broken_on_current_torch():
    problem = cnn_problem()
    model = problem.model.float()
    x = torch.cat([b[0] for b in problem.batches]).float()
    y = torch.cat([b[1] for b in problem.batches])
    with pytest.raises(RuntimeError, match="torch.eig|removed"):
        pyhessian.hessian(model, problem.loss_fn, data=(x, y), cuda=False).density(iter=5, n_v=1)


def test_curvlinops_eigsh_agrees():
    curvlinops = pytest.importorskip("curvlinops", reason="curvlinops (compare extra) not installed")
    from scipy.sparse.linalg import eigsh

    problem = cnn_problem()
    params = [p for p in problem.model.parameters() if p.requires_grad]
    op = curvlinops.HessianLinearOperator(problem.model, problem.loss_fn, params, problem.batches,
                                          check_deterministic=False).to_scipy()
    lmax = eigsh(op, k=1, which="LA", tol=1e-10, return_eigenvectors=False)[0]
    lmin = eigsh(op, k=1, which="SA", tol=1e-10, return_eigenvectors=False)[0]
    ours = _ours(problem.loss_fn)
    scale = max(abs(lmax), abs(lmin))
    assert abs(ours.lambda_max - lmax) <= 1e-8 * scale
    assert abs(ours.lambda_min - lmin) <= 1e-8 * scale
    np.testing.assert_allclose([ours.lambda_max, ours.lambda_min], [lmax, lmin], rtol=1e-8)
