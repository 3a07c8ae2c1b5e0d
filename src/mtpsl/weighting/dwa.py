"""``dwa``: dynamic weight average (Liu, Johns & Davison, CVPR 2019, MTAN)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mtpsl.weighting.base import (
    WEIGHTINGS,
    GradientContext,
    Weighting,
    backward_total,
    weighted_sum,
)


class DWAOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    temperature: float = Field(default=2.0, gt=0.0)
    """Softmax temperature T (2 in MTAN)."""


@WEIGHTINGS.register("dwa")
class DWA(Weighting):
    """Dynamic Weight Average (Liu et al. 2019, MTAN): per-epoch weights from loss ratios.

    ``w_k = K * softmax_k(r_k / temperature)`` with ``r_k = L_k(e-1) / L_k(e-2)`` the ratio
    of the last two epochs' mean training losses; weight 1 for the first two epochs. Partial
    labels: the softmax runs, each step, over the present tasks whose ratio can be formed (K is
    their number), so a task absent from the batch takes no share of the others' weight; a
    present task without a ratio (no loss in one of those epochs) gets weight 1.
    """

    linear_in_losses = True  # the weights are fixed within a step

    Options = DWAOptions
    options: DWAOptions
    history: Tensor
    epochs_seen: Tensor

    def __init__(self, task_names: Sequence[str], options: BaseModel | None = None) -> None:
        super().__init__(task_names, options)
        n = len(self.task_names)
        self.register_buffer("history", torch.full((2, n), float("nan")))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))

    @property
    def lambdas(self) -> Tensor:
        """The weights when every task is present."""
        return self.step_weights(torch.ones(len(self.task_names), dtype=torch.bool))

    def step_weights(self, present: Tensor) -> Tensor:
        """This step's weights ``[T]`` (on the device, no host sync)."""
        return dwa_weights(self.history[0], self.history[1], self.options.temperature,
                           present.to(self.history.device))

    def backward(
        self,
        task_losses: Mapping[str, Tensor],
        extra: Tensor,
        context: GradientContext,
    ) -> Tensor:
        weights = self.step_weights(context.present)
        return backward_total(weighted_sum(weights, task_losses, self.task_names) + extra)

    @torch.no_grad()
    def end_epoch(self, task_means: Mapping[str, float]) -> None:
        row = [float(task_means.get(t, math.nan)) for t in self.task_names]
        self.history[0] = self.history[1].clone()
        self.history[1] = torch.tensor(row, device=self.history.device)
        self.epochs_seen += 1


def dwa_weights(before: Tensor, last: Tensor, temperature: float,
                present: Tensor | None = None) -> Tensor:
    """DWA's weights from two epochs' mean losses over the ``present`` tasks (all if None)
    whose ratio is valid; the other tasks get 1."""
    ratio = last / before
    valid = torch.isfinite(ratio) & (before > 0)
    if present is not None:
        valid = valid & present
    logits = torch.where(valid, ratio / temperature, -math.inf)
    shares = valid.sum() * torch.softmax(logits, dim=0)
    return torch.where(valid, shares, 1.0).float()
