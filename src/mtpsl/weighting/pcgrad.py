"""``pcgrad``: projecting conflicting gradients (Yu et al., NeurIPS 2020)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from mtpsl.weighting.base import WEIGHTINGS, SeededDraws
from mtpsl.weighting.gradient import GradientWeighting


class PCGradOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    seed: int = 0
    """Seed of the strategy's own generator for the projection orders."""


@WEIGHTINGS.register("pcgrad")
class PCGrad(SeededDraws, GradientWeighting):
    """PCGrad (Yu et al. 2020): project away conflicting components, then sum.

    For each present task, its gradient is projected onto the normal plane of every other
    task's (original) gradient it conflicts with (negative dot product), in a random order
    drawn per task from the strategy's own generator; the projected gradients are summed.
    The generator's state is saved with the strategy (``state_dict``), so a resumed run draws
    the same orders. Task-specific parameters get the plain sum.
    """

    Options = PCGradOptions
    options: PCGradOptions

    def __init__(self, task_names: Sequence[str], options: BaseModel | None = None) -> None:
        super().__init__(task_names, options)
        self.seed_generator(self.options.seed)

    def coefficients(self, gram: np.ndarray, losses: np.ndarray,
                     tasks: Sequence[int] | None = None) -> np.ndarray:
        k = len(gram)
        orders = [torch.randperm(k, generator=self.generator).tolist() for _ in range(k)]
        return pcgrad_coefficients(gram, orders)


def pcgrad_coefficients(gram: np.ndarray, orders: Sequence[Sequence[int]]) -> np.ndarray:
    """Coefficients of the summed projected gradients in the original ones.

    Row ``i`` of ``coef`` expresses task ``i``'s projected gradient; its dot product with
    ``g_j`` is ``coef[i] @ gram[:, j]``, so only the Gram matrix is needed.
    """
    k = len(gram)
    coef = np.eye(k)
    for i in range(k):
        for j in orders[i]:
            if j == i or gram[j, j] <= 0.0:
                continue
            dot = coef[i] @ gram[:, j]
            if dot < 0.0:
                coef[i, j] -= dot / gram[j, j]
    return coef.sum(0)
