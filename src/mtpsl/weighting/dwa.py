"""``dwa``: dynamic weight average (Liu, Johns & Davison, CVPR 2019, MTAN)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from .base import WEIGHTINGS, Weighting, weighted_sum


class DWAOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    temperature: float = Field(default=2.0, gt=0.0)
    """Softmax temperature T (2 in MTAN)."""


@WEIGHTINGS.register("dwa")
class DWA(Weighting):
    """Dynamic Weight Average (Liu et al. 2019, MTAN): per-epoch weights from loss ratios.

    ``w_k = T_tasks * softmax_k(r_k / temperature)`` with ``r_k = L_k(e-1) / L_k(e-2)`` the
    ratio of the last two epochs' mean training losses; weight 1 for the first two epochs. A
    ratio that cannot be formed (a task with no loss in one of those epochs) counts as 1.
    """

    linear_in_losses = True  # the weights are fixed within an epoch

    Options = DWAOptions
    options: DWAOptions
    history: Tensor
    epochs_seen: Tensor
    lambdas: Tensor

    def __init__(self, task_names: Sequence[str], options: BaseModel | None = None) -> None:
        super().__init__(task_names, options)
        n = len(self.task_names)
        self.register_buffer("history", torch.full((2, n), float("nan")))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("lambdas", torch.ones(n))

    def combine(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        return weighted_sum(self.lambdas, task_losses, self.task_names)

    @torch.no_grad()
    def end_epoch(self, task_means: Mapping[str, float]) -> None:
        row = [float(task_means.get(t, math.nan)) for t in self.task_names]
        self.history[0] = self.history[1].clone()
        self.history[1] = torch.tensor(row, device=self.history.device)
        self.epochs_seen += 1
        if int(self.epochs_seen) >= 2:
            self.lambdas.copy_(
                dwa_weights(self.history[0], self.history[1], self.options.temperature)
            )


def dwa_weights(before: Tensor, last: Tensor, temperature: float) -> Tensor:
    """DWA's weights from two epochs' mean losses (invalid ratios count as 1)."""
    ratio = last / before
    ratio = torch.where(torch.isfinite(ratio) & (before > 0), ratio, torch.ones_like(ratio))
    return (len(ratio) * torch.softmax(ratio / temperature, dim=0)).float()
