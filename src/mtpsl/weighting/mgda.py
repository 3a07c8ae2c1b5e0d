"""``mgda``: the min-norm point of the task gradients' convex hull (Sener & Koltun,
NeurIPS 2018; MGDA-UB's Frank-Wolfe solver on the Gram matrix)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from mtpsl.weighting.base import WEIGHTINGS
from mtpsl.weighting.gradient import GradientWeighting


class MGDAOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    normalisation: Literal["none", "l2", "loss", "loss+"] = "none"
    """Gradient normaliser before the min-norm solve, as Sener & Koltun's code: none, the
    gradient's l2 norm, the loss value, or loss times l2 norm."""


@WEIGHTINGS.register("mgda")
class MGDA(GradientWeighting):
    """MGDA (Sener & Koltun 2018): descend along the min-norm point of the task gradients.

    The weights ``alpha`` (on the simplex) minimise ``||sum_k alpha_k g_k / n_k||`` with
    ``n_k`` the normaliser; they then weight the raw losses, heads included, as the authors'
    code does. The gradients are taken with respect to the shared parameters (the exact
    problem); ``mgda_ub`` takes them with respect to the shared representation instead.
    Solved in closed form for two tasks and by Frank-Wolfe otherwise.
    """

    Options = MGDAOptions
    options: MGDAOptions
    heads_follow = True

    def coefficients(self, gram: np.ndarray, losses: np.ndarray,
                     tasks: Sequence[int] | None = None) -> np.ndarray:
        norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
        scale = {
            "none": np.ones_like(losses),
            "l2": norms,
            "loss": losses,
            "loss+": losses * norms,
        }[self.options.normalisation]
        scale = np.maximum(scale, 1e-12)
        return min_norm_coefficients(gram / np.outer(scale, scale))


def _two_point(aa: float, ab: float, bb: float) -> float:
    """gamma in [0, 1] minimising ||gamma a + (1 - gamma) b||^2, from the inner products."""
    denom = aa - 2.0 * ab + bb
    if denom <= 1e-20:
        return 1.0
    return float(np.clip((bb - ab) / denom, 0.0, 1.0))


def min_norm_coefficients(gram: np.ndarray, max_iter: int = 1000, tol: float = 1e-10) -> np.ndarray:
    """The point of the simplex minimising ``w^T gram w`` (the min-norm convex combination).

    Exact for two vectors; otherwise Frank-Wolfe with exact line search, started from the best
    pair.
    """
    k = len(gram)
    w = np.zeros(k)
    if k == 1:
        return np.ones(1)
    best = math.inf
    for i in range(k):
        for j in range(i + 1, k):
            g = _two_point(gram[i, i], gram[i, j], gram[j, j])
            cost = g * g * gram[i, i] + 2 * g * (1 - g) * gram[i, j] + (1 - g) ** 2 * gram[j, j]
            if cost < best:
                best, w = cost, np.zeros(k)
                w[i], w[j] = g, 1.0 - g
    for _ in range(max_iter if k > 2 else 0):
        gw = gram @ w
        t = int(np.argmin(gw))
        gamma = _two_point(float(w @ gw), float(gw[t]), float(gram[t, t]))
        new = gamma * w
        new[t] += 1.0 - gamma
        if np.abs(new - w).sum() < tol:
            return new
        w = new
    return w
