"""``cagrad``: conflict-averse gradient descent (Liu, Liu, Jin, Stone & Liu, NeurIPS 2021)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mtpsl.weighting.base import WEIGHTINGS
from mtpsl.weighting.gradient import GradientWeighting


class CAGradOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    c: float = Field(default=0.4, ge=0.0)
    """Radius of the trust region around the mean gradient, relative to its norm."""
    rescale: Literal[0, 1, 2] = 1
    """Divide the update by 1 (0), 1 + c^2 (1, the authors' default) or 1 + c (2)."""


@WEIGHTINGS.register("cagrad")
class CAGrad(GradientWeighting):
    """CAGrad (Liu et al. 2021): the update maximising the worst task's improvement near g0.

    With ``g0`` the mean gradient, the dual ``min_{w in simplex} g_w . g0 + c ||g0|| ||g_w||``
    (``g_w = sum_k w_k g_k``) is solved on the Gram matrix by projected gradient descent with
    backtracking; the update is ``(g0 + c ||g0|| g_w / ||g_w||) / rescale`` on the shared
    parameters. ``c = 0`` gives the mean gradient. Task-specific parameters get the plain sum.
    """

    Options = CAGradOptions
    options: CAGradOptions

    def coefficients(self, gram: np.ndarray, losses: np.ndarray,
                     tasks: Sequence[int] | None = None) -> np.ndarray:
        return cagrad_coefficients(gram, self.options.c, self.options.rescale)


def cagrad_coefficients(gram: np.ndarray, c: float, rescale: int = 1) -> np.ndarray:
    """Coefficients of CAGrad's update in the task gradients (see :class:`CAGrad`)."""
    k = len(gram)
    mean = np.full(k, 1.0 / k)
    g0_norm = math.sqrt(max(gram.mean(), 0.0))
    radius = c * g0_norm
    w = cagrad_dual(gram, radius)
    gw_norm = math.sqrt(max(w @ gram @ w, 0.0))
    alpha = mean + radius / (gw_norm + 1e-8) * w
    return alpha / {0: 1.0, 1: 1.0 + c * c, 2: 1.0 + c}[rescale]


def cagrad_dual(
    gram: np.ndarray, radius: float, max_iter: int = 500, tol: float = 1e-12
) -> np.ndarray:
    """argmin over the simplex of ``w^T gram b + radius sqrt(w^T gram w)``, b uniform."""
    k = len(gram)
    scale = float(np.trace(gram)) / k
    w = np.full(k, 1.0 / k)
    if scale <= 0.0 or radius == 0.0 or k == 1:
        return w
    a, r = gram / scale, radius / math.sqrt(scale)  # the objective scales by 1/scale
    linear = a @ w

    def value(x: np.ndarray) -> float:
        return float(x @ linear + r * math.sqrt(max(x @ a @ x, 0.0) + 1e-12))

    def grad(x: np.ndarray) -> np.ndarray:
        return linear + r * (a @ x) / math.sqrt(max(x @ a @ x, 0.0) + 1e-12)

    step, current = 1.0, value(w)
    for _ in range(max_iter):
        g = grad(w)
        while True:
            new = project_simplex(w - step * g)
            diff = new - w
            bound = current + g @ diff + diff @ diff / (2 * step)
            new_value = value(new)
            if new_value <= bound + 1e-15 or step < 1e-12:
                break
            step *= 0.5
        if diff @ diff < tol:
            return new
        w, current, step = new, new_value, step * 2.0
    return w


def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the probability simplex (sort-based)."""
    u = np.sort(v)[::-1]
    cumulative = np.cumsum(u) - 1.0
    ks = np.arange(1, len(v) + 1)
    rho = ks[u - cumulative / ks > 0][-1]
    return np.maximum(v - cumulative[rho - 1] / rho, 0.0)
