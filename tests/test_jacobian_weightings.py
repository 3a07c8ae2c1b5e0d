"""The torchjd Gramian weightings (imtl_g, aligned_mtl, upgrad, dualproj): each one's defining
property against an independent computation on random task gradients, the partial-label case
through mtpsl's gradient rule, and the message when a solver is missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from mtpsl.core.errors import ConfigError
from mtpsl.weighting import GradientContext, build_weighting

pytest.importorskip("torchjd")
K, P = 3, 6


def _jacobian(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((K, P))


def _update(name: str, jac: np.ndarray, **options) -> np.ndarray:
    weights = build_weighting(name, [f"t{k}" for k in range(len(jac))], options).coefficients(
        jac @ jac.T, np.ones(len(jac)))
    return jac.T @ weights


EXACT = {"norm_eps": 0.0, "reg_eps": 0.0}
"""The dual-cone solvers without torchjd's stabilising tolerances: the exact projection."""


def _dual_cone_projection(v: np.ndarray, jac: np.ndarray) -> np.ndarray:
    """argmin ||x - v||^2 subject to jac @ x >= 0 (scipy's SLSQP: an independent solver)."""
    res = minimize(lambda x: ((x - v) ** 2).sum(), v, jac=lambda x: 2 * (x - v),
                   constraints=[{"type": "ineq", "fun": lambda x: jac @ x, "jac": lambda x: jac}],
                   method="SLSQP", options={"ftol": 1e-14, "maxiter": 500})
    assert res.success
    return res.x


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_imtl_g_has_equal_projections_on_every_unit_task_gradient(seed):
    jac = _jacobian(seed)
    d = _update("imtl_g", jac)
    projections = jac @ d / np.linalg.norm(jac, axis=1)
    np.testing.assert_allclose(projections, projections[0], rtol=1e-6)
    weights = np.linalg.lstsq(jac.T, d, rcond=None)[0]
    assert weights.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aligned_mtl_is_the_mean_of_the_orthogonalised_equal_norm_gradients(seed):
    jac = _jacobian(seed)
    u, s, vt = np.linalg.svd(jac, full_matrices=False)
    aligned = s.min() * u @ vt  # rows orthogonal, each of norm sigma_min
    np.testing.assert_allclose(_update("aligned_mtl", jac), aligned.mean(axis=0), atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_upgrad_averages_the_projections_onto_the_dual_cone(seed):
    jac = _jacobian(seed)
    expected = np.mean([_dual_cone_projection(g, jac) for g in jac], axis=0)
    d = _update("upgrad", jac, **EXACT)
    np.testing.assert_allclose(d, expected, atol=1e-6)
    assert (jac @ d >= -1e-9).all()  # conflicts with no task
    np.testing.assert_allclose(_update("upgrad", jac), expected, atol=2e-3)  # the defaults


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dualproj_projects_the_mean_gradient_onto_the_dual_cone(seed):
    jac = _jacobian(seed)
    expected = _dual_cone_projection(jac.mean(axis=0), jac)
    np.testing.assert_allclose(_update("dualproj", jac, **EXACT), expected, atol=1e-6)
    np.testing.assert_allclose(_update("dualproj", jac), expected, atol=2e-3)


@pytest.mark.parametrize("name", ["imtl_g", "aligned_mtl", "upgrad", "dualproj"])
def test_an_absent_task_leaves_the_strategy_on_the_present_tasks(name):
    """Through the gradient rule: the shared gradient with task b absent equals the strategy
    built for tasks a and c alone."""
    targets = torch.randn(3, 5, generator=torch.Generator().manual_seed(3))

    def shared_grad(names, present):
        shared = torch.nn.Parameter(torch.zeros(5))
        losses = {n: ((shared - targets[k]) ** 2).sum() * (k + 1) for k, n in enumerate("abc")
                  if n in names}
        if "b" in names and not present[1]:
            losses["b"] = losses["b"] * 0.0
        build_weighting(name, names).backward(
            losses, torch.zeros(()), GradientContext(torch.tensor(present), [shared]))
        return shared.grad

    partial = shared_grad(("a", "b", "c"), [True, False, True])
    alone = shared_grad(("a", "c"), [True, True])
    torch.testing.assert_close(partial, alone)


def test_a_missing_solver_says_how_to_install_it(monkeypatch):
    import mtpsl.weighting.upgrad as upgrad

    def no_quadprog(options):  # what torchjd's QuadprogProjector raises without quadprog
        raise ImportError("QuadprogProjector requires ['qpsolvers', 'quadprog']")

    monkeypatch.setattr(upgrad, "dual_cone_projector", no_quadprog)
    with pytest.raises(ConfigError, match=r'pip install "mtpsl\[solvers\]"'):
        build_weighting("upgrad", ["a", "b"])
