"""``modo``: multi-objective gradient with double sampling (Chen, Fernando, Ying & Chen,
"Three-Way Trade-Off in Multi-Objective Learning: Optimization, Generalization and
Conflict-Avoidance", NeurIPS 2023), as torchjd's ``MoDoWeighting``.

The weights ``lambda`` live on the simplex and take one projected gradient step per batch on
``lambda' G lambda / 2 + rho ||lambda||^2 / 2``:
``lambda <- P_simplex(lambda - gamma (G lambda + rho lambda))``; the shared update is
``sum_k lambda_k g_k`` (heads: the plain sum). The paper forms ``G`` from two independent
batches (``J_1 J_2'``) so that the step is unbiased; like torchjd, this uses the Gram matrix of
the one batch (a second batch would change the data loader, not the strategy). Defaults
gamma = rho = 0.1 are torchjd's.

Partial labels: ``lambda`` has one entry per task, read and written for the present tasks as
:mod:`mtpsl.weighting.simplex_state` says, so the result is MoDo on the present tasks alone.
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


class MoDoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    gamma: float = Field(default=0.1, gt=0.0)
    """Step size of the weights (torchjd's default)."""
    rho: float = Field(default=0.1, ge=0.0)
    """Their l2 regularisation (torchjd's default)."""


@WEIGHTINGS.register("modo")
class MoDo(GradientWeighting):
    """MoDo (Chen et al., NeurIPS 2023): one projected step on the weights per batch."""

    Options = MoDoOptions
    options: MoDoOptions
    weights: Tensor

    def __init__(self, task_names: Sequence[str], options: BaseModel | None = None) -> None:
        super().__init__(task_names, options)
        k = len(self.task_names)
        self.register_buffer("weights", torch.full((k,), 1.0 / k, dtype=torch.float64))

    def coefficients(self, gram: np.ndarray, losses: np.ndarray,
                     tasks: Sequence[int] | None = None) -> np.ndarray:
        tasks = task_indices(tasks, len(gram))
        lam, mass = read_simplex(self.weights, tasks)
        lam = project_simplex(lam - self.options.gamma * (gram @ lam + self.options.rho * lam))
        write_simplex(self.weights, tasks, lam, mass)
        return lam
