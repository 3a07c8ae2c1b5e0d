"""``nash_mtl``: multi-task learning as a bargaining game (Navon, Shamsian, Achituve, Maron,
Kawaguchi, Chechik & Fetaya, ICML 2022).

The weights are the Nash bargaining solution: ``alpha > 0`` with ``(G alpha)_k = 1 / alpha_k``
for every present task (``G`` their Gram matrix), i.e. every task's share of the update
``d = sum_k alpha_k g_k`` satisfies ``alpha_k g_k . d = 1``. The reference code approaches it
by 20 convex-concave steps of cvxpy/ECOS; here it is computed exactly and without a solver
dependency, as the minimiser of the strictly convex
``F(alpha) = alpha' G alpha / 2 - sum_k log alpha_k`` (its gradient is ``G alpha - 1/alpha``)
by damped Newton steps on the K x K problem. A tiny ridge (1e-12 of G's trace) keeps F bounded
below when the gradients are linearly dependent (exactly opposed tasks admit no bargaining
solution; the reference then keeps its previous weights). The weights scale the losses, heads
included, and the shared update is then shrunk to ``||d|| <= max_norm`` (the reference's
default 1; 0 turns the clip off), as the reference code clips the shared parameters' gradient
(here the clip leaves the method's extra terms alone).

Not kept from the reference: ``update_weights_every`` (reusing weights across batches whose
present tasks differ has no meaning under partial labels, and the K x K solve costs nothing
next to the K backward passes). Being stateless, an absent task leaves nothing behind and
the result is Nash-MTL on the present tasks alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mtpsl.weighting.base import WEIGHTINGS
from mtpsl.weighting.gradient import GradientWeighting


class NashMTLOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    max_norm: float = Field(default=1.0, ge=0.0)
    """Largest norm of the shared update (the reference's default); 0: no clip."""


@WEIGHTINGS.register("nash_mtl")
class NashMTL(GradientWeighting):
    """Nash-MTL (Navon et al., ICML 2022): the bargaining weights ``G alpha = 1/alpha``."""

    Options = NashMTLOptions
    options: NashMTLOptions
    heads_follow = True

    def coefficients(self, gram: np.ndarray, losses: np.ndarray,
                     tasks: Sequence[int] | None = None) -> np.ndarray:
        return nash_weights(gram)

    def update(self, grads: Tensor, losses: Tensor, tasks: Sequence[int]
               ) -> tuple[Tensor, Tensor | None]:
        """The weights scale the losses; the shared update alone is clipped, as the
        reference's ``clip_grad_norm_`` on the shared parameters after the backward pass."""
        heads, _ = super().update(grads, losses, tasks)
        update = heads @ grads
        norm = float(torch.linalg.vector_norm(update))
        if self.options.max_norm <= 0 or norm <= self.options.max_norm:
            return heads, None
        return heads, (self.options.max_norm / norm - 1.0) * update


def nash_weights(gram: np.ndarray, tol: float = 1e-12, max_iter: int = 100) -> np.ndarray:
    """The ``alpha > 0`` with ``gram @ alpha = 1 / alpha`` (damped Newton on the convex F)."""
    k = len(gram)
    diag = np.diag(gram)
    if not np.all(diag > 0):  # a zero gradient: F has no minimum; such a task moves nothing
        alpha = np.zeros(k)
        live = diag > 0
        if live.any():
            alpha[live] = nash_weights(gram[np.ix_(live, live)], tol, max_iter)
        return alpha
    gram = gram + 1e-12 * np.trace(gram) * np.eye(k)

    def objective(a: np.ndarray) -> float:
        return 0.5 * a @ gram @ a - np.log(a).sum()

    alpha = 1.0 / np.sqrt(np.diag(gram))  # exact for orthogonal gradients
    for _ in range(max_iter):
        grad = gram @ alpha - 1.0 / alpha
        if np.linalg.norm(grad * alpha) < tol:  # relative residual of alpha_k (G alpha)_k = 1
            break
        step = np.linalg.solve(gram + np.diag(1.0 / alpha**2), -grad)
        t = 1.0
        while np.any(alpha + t * step <= 0) or objective(alpha + t * step) > objective(alpha):
            t *= 0.5
            if t < 1e-12:
                return alpha
        alpha = alpha + t * step
    return alpha
