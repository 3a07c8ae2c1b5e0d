"""``gradvac``: gradient vaccine (Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine: Investigating
and Improving Multi-task Optimization in Massively Multilingual Models", ICLR 2021).

For every task ``i`` and, in a random order, every other task ``j``: if the cosine ``phi`` of
``i``'s (already corrected) gradient with ``j``'s original gradient is below the target
``phi_hat[i, j]``, add the multiple of ``g_j`` that raises the cosine to the target; then move
the target towards ``phi``, ``phi_hat <- (1 - beta) phi_hat + beta phi``. The shared update is
the sum of the corrected gradients. Everything follows from the Gram matrix (the corrected
gradients are combinations of the original ones), as in torchjd's ``GradVacWeighting``, which
the test checks this against on the same orders. Written here rather than wrapped because
the targets are per task pair: torchjd keeps one K x K matrix and resets it when K changes,
which under partial labels (K = the tasks present) would forget them every few batches.
Here ``phi_hat`` is T x T over all tasks and a batch reads and updates only the present
pairs, so an absent task's targets are left untouched and the result is GradVac on the
present tasks alone. The EMA moves every visited pair, as the paper and torchjd do (LibMTL
moves it only when a correction was made). ``beta`` = 0.5 is LibMTL's and torchjd's default.
The orders come from the strategy's own generator, saved with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mtpsl.weighting.base import WEIGHTINGS, SeededDraws
from mtpsl.weighting.gradient import GradientWeighting, task_indices


class GradVacOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    beta: float = Field(default=0.5, ge=0.0, le=1.0)
    """Rate of the targets' moving average (LibMTL's and torchjd's default)."""
    eps: float = Field(default=1e-8, ge=0.0)
    """Added to the denominators (torchjd's default)."""
    seed: int = 0
    """Seed of the strategy's own generator for the visiting orders."""


@WEIGHTINGS.register("gradvac")
class GradVac(SeededDraws, GradientWeighting):
    """GradVac (Wang et al., ICLR 2021): raise every pair's cosine to its moving target."""

    Options = GradVacOptions
    options: GradVacOptions
    targets: Tensor

    def __init__(self, task_names: Sequence[str], options: BaseModel | None = None) -> None:
        super().__init__(task_names, options)
        k = len(self.task_names)
        self.register_buffer("targets", torch.zeros(k, k, dtype=torch.float64))
        self.seed_generator(self.options.seed)

    def coefficients(self, gram: np.ndarray, losses: np.ndarray,
                     tasks: Sequence[int] | None = None) -> np.ndarray:
        tasks = task_indices(tasks, len(gram))
        index = torch.tensor(tasks)
        targets = self.targets.cpu()[index][:, index].numpy()
        coef = gradvac_coefficients(gram, targets, self.options.beta, self.options.eps,
                                    self._orders(len(gram)))
        self.targets[index[:, None], index[None, :]] = torch.from_numpy(targets).to(
            self.targets.device)
        return coef

    def _orders(self, k: int) -> list[list[int]]:
        orders = []
        for i in range(k):
            others = [j for j in range(k) if j != i]
            orders.append([others[p] for p in torch.randperm(k - 1, generator=self.generator)])
        return orders


def gradvac_coefficients(gram: np.ndarray, targets: np.ndarray, beta: float, eps: float,
                         orders: Sequence[Sequence[int]]) -> np.ndarray:
    """Coefficients of the summed corrected gradients; ``targets`` is updated in place."""
    k = len(gram)
    coef = np.eye(k)
    for i in range(k):
        dots = coef[i] @ gram  # corrected g_i . original g_j, for every j
        for j in orders[i]:
            norm_i = np.sqrt(max(dots @ coef[i], 0.0))
            norm_j = np.sqrt(max(gram[j, j], 0.0))
            phi = dots[j] / (norm_i * norm_j + eps)
            target = targets[i, j]
            if phi < target:
                root_phi = np.sqrt(max(1.0 - phi * phi, 0.0))
                root_target = np.sqrt(max(1.0 - target * target, 0.0))
                w = norm_i * (target * root_phi - phi * root_target) / (norm_j * root_target + eps)
                coef[i, j] += w
                dots = dots + w * gram[j]
            targets[i, j] = (1.0 - beta) * target + beta * phi
    return coef.sum(0)
