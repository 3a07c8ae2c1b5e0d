"""``cr_mogm``: correlation-reduced stochastic multi-objective gradient manipulation (Zhou et
al., "On the Convergence of Stochastic Multi-Objective Gradient
Manipulation and Beyond", NeurIPS 2022), as torchjd's ``CRMOGMWeighting``.

A wrapper: the weights of another gradient strategy (``base``, MGDA by default, with its
``base_options``) are smoothed by a moving average, ``lambda <- alpha lambda + (1 - alpha) w``
(torchjd's default alpha 0.9), which removes the bias of weights computed from the same noisy
batch as the gradients they weight. The average starts at a task's first weights. Partial
labels: lambda holds one entry per task and a batch moves the present tasks' entries only,
so the result is CR-MOGM on the present tasks alone. Only bases that produce per-task
coefficients from the Gram matrix can be wrapped (not the Jacobian aggregators).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mtpsl.core.errors import ConfigError
from mtpsl.weighting.base import WEIGHTINGS, build_weighting
from mtpsl.weighting.gradient import GradientWeighting, task_indices


class CRMOGMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    base: str = "mgda"
    """The gradient strategy whose weights are averaged."""
    base_options: dict[str, Any] = Field(default_factory=dict)
    """Its options."""
    alpha: float = Field(default=0.9, ge=0.0, le=1.0)
    """Weight of the past in the average (torchjd's default)."""


@WEIGHTINGS.register("cr_mogm")
class CRMOGM(GradientWeighting):
    """CR-MOGM (Zhou et al., NeurIPS 2022): a moving average of a base strategy's weights."""

    Options = CRMOGMOptions
    options: CRMOGMOptions
    weights: Tensor
    started: Tensor

    def __init__(self, task_names: Sequence[str], options: BaseModel | None = None) -> None:
        super().__init__(task_names, options)
        base = build_weighting(self.options.base, task_names, self.options.base_options)
        if not isinstance(base, GradientWeighting) or (
                type(base).coefficients is GradientWeighting.coefficients):
            raise ConfigError(f"method.weighting_options.base: {self.options.base!r} gives no "
                              f"per-task coefficients; use a Gram-matrix strategy such as "
                              f"mgda, cagrad, imtl_g, nash_mtl")
        self.base = base
        k = len(self.task_names)
        self.register_buffer("weights", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("started", torch.zeros(k, dtype=torch.bool))

    def coefficients(self, gram: np.ndarray, losses: np.ndarray,
                     tasks: Sequence[int] | None = None) -> np.ndarray:
        tasks = task_indices(tasks, len(gram))
        fresh = torch.from_numpy(self.base.coefficients(gram, losses, tasks))
        index = torch.tensor(tasks)
        past, started = self.weights.cpu()[index], self.started.cpu()[index]
        alpha = self.options.alpha
        mixed = torch.where(started, alpha * past + (1.0 - alpha) * fresh, fresh)
        self.weights[index.to(self.weights.device)] = mixed.to(self.weights.device)
        self.started[index.to(self.started.device)] = True
        return mixed.numpy()
