"""``sdmgrad``: stochastic direction-oriented multi-objective gradient descent (Xiao, Ban & Ji,
"Direction-oriented Multi-objective Learning: Simple and Provable Stochastic Algorithms",
NeurIPS 2023), as torchjd's ``SDMGradWeighting``.

The weights ``w`` on the simplex are refined every batch by ``n_iter`` steps of projected SGD
with momentum on ``(w + lambda w~)' A (w + lambda w~) / 2`` (``A`` the Gram matrix divided by
the squared mean gradient norm, ``w~`` uniform: the average gradient as the preferred
direction); the shared update uses ``(w + lambda w~) / (1 + lambda)``, between MGDA's
direction and the mean. The paper forms ``A`` from two independent batches; like MoDo here,
this uses the one batch's Gram matrix. Defaults (lr 10, momentum 0.5, 20 iterations,
lambda 0.3, option ``pull``) are torchjd's, which takes lambda from the authors' experiments
and LibMTL.

Partial labels: ``w`` is simplex state over all tasks, read and written for the present ones
as :mod:`mtpsl.weighting.simplex_state` says; ``w~`` is uniform over the present tasks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mtpsl.weighting.base import WEIGHTINGS
from mtpsl.weighting.cagrad import project_simplex
from mtpsl.weighting.gradient import GradientWeighting, task_indices
from mtpsl.weighting.simplex_state import read_simplex, write_simplex


class SDMGradOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    lr: float = Field(default=10.0, gt=0.0)
    """Step size of the inner solver."""
    momentum: float = Field(default=0.5, ge=0.0, lt=1.0)
    """Its momentum."""
    n_iter: int = Field(default=20, ge=1)
    """Its iterations per batch."""
    pull: float = Field(default=0.3, ge=0.0)
    """The paper's lambda: how far the direction is pulled towards the average gradient."""


@WEIGHTINGS.register("sdmgrad")
class SDMGrad(GradientWeighting):
    """SDMGrad (Xiao et al., NeurIPS 2023): MGDA's weights pulled towards the mean."""

    Options = SDMGradOptions
    options: SDMGradOptions
    weights: Tensor

    def __init__(self, task_names: Sequence[str], options: BaseModel | None = None) -> None:
        super().__init__(task_names, options)
        k = len(self.task_names)
        self.register_buffer("weights", torch.full((k,), 1.0 / k, dtype=torch.float64))

    def coefficients(self, gram: np.ndarray, losses: np.ndarray,
                     tasks: Sequence[int] | None = None) -> np.ndarray:
        tasks = task_indices(tasks, len(gram))
        w, mass = read_simplex(self.weights, tasks)
        o = self.options
        preferred = np.full(len(gram), 1.0 / len(gram))
        scale = np.sqrt(np.clip(np.diag(gram), 0.0, None)).mean()
        a = gram / (scale**2 + 1e-8)
        velocity = None
        for _ in range(o.n_iter):
            grad = a @ (w + o.pull * preferred)
            velocity = grad if velocity is None else o.momentum * velocity + grad
            w = project_simplex(w - o.lr * velocity)
        write_simplex(self.weights, tasks, w, mass)
        return (w + o.pull * preferred) / (1.0 + o.pull)
