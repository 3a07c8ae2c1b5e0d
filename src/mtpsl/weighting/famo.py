"""``famo``: fast adaptive multitask optimisation (Liu, Liu, Stone & Liu, "FAMO: Fast Adaptive
Multitask Optimization", NeurIPS 2023).

A loss-level method with O(1) cost per step (no per-task gradients): task weights
``z = softmax(w)`` weight the log losses, normalised so that the update decreases every task's
log loss at a rate proportional to its weight: the objective is ``sum_k z_k log L_k / c`` with
``c = sum_k z_k / L_k`` (treated as a constant). After the optimiser step the same batch's
losses are evaluated again (the loop does it: ``wants_losses_after_step``), and the logits ``w``
take one Adam step (with weight decay) along ``d softmax(w) / d w`` applied to the observed
decrease ``log L_before - log L_after``, so a task whose loss fell less gets more weight next
time. The reference code's defaults: Adam learning rate 0.025, weight decay 0.01 (the
decay its experiment scripts pass may differ: tune it); losses are offset by 1e-8, and the
minimum losses (0 by default there) are taken as 0. The reference clips the shared
gradient's norm too; here that is ``train.clip_norm``, for every strategy.

Partial labels: the softmax, the objective and the logits' update run over the present tasks
(a batch's losses after the step are those of the same tasks); the logits are one parameter
per task, so Adam does not touch an absent task's logit or its moments. The logits are updated
by the strategy itself (its own Adam, saved with it), not by the run's optimisers. Under
torchrun the weights come from the processes' mean losses, before and after the step.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mtpsl.core.distributed import mean_over_ranks
from mtpsl.weighting.base import (
    WEIGHTINGS,
    GradientContext,
    Weighting,
    backward_linearised,
    backward_total,
)

OFFSET = 1e-8


class FAMOOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    lr: float = Field(default=0.025, gt=0.0)
    """Adam's learning rate for the logits (the reference's default)."""
    weight_decay: float = Field(default=0.01, ge=0.0)
    """Adam's weight decay on the logits (the reference class's default)."""


@WEIGHTINGS.register("famo")
class FAMO(Weighting):
    """FAMO (Liu et al., NeurIPS 2023): weights learned from each step's loss decrease."""

    Options = FAMOOptions
    options: FAMOOptions
    wants_losses_after_step = True
    before: Tensor

    def __init__(self, task_names: Sequence[str], options: BaseModel | None = None) -> None:
        super().__init__(task_names, options)
        self.logits = nn.ParameterList(nn.Parameter(torch.zeros(())) for _ in self.task_names)
        self.register_buffer("before", torch.zeros(len(self.task_names)))
        """The present tasks' losses of the last step, before it."""
        self._optimiser: torch.optim.Adam | None = None
        self._pending: dict[str, Any] | None = None

    def trained_parameters(self) -> list[nn.Parameter]:
        return []  # the logits are stepped in after_step

    @property
    def optimiser(self) -> torch.optim.Adam:
        if self._optimiser is None:  # created after the module reached its device
            self._optimiser = torch.optim.Adam(self.logits, lr=self.options.lr,
                                               weight_decay=self.options.weight_decay)
            if self._pending is not None:
                self._optimiser.load_state_dict(self._pending)
        return self._optimiser

    def get_extra_state(self) -> dict[str, Any]:
        return self.optimiser.state_dict()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._pending, self._optimiser = copy.deepcopy(state), None  # not the saver's tensors

    def weights(self, indices: Sequence[int]) -> Tensor:
        """``softmax`` of the present tasks' logits."""
        return torch.softmax(torch.stack([self.logits[i] for i in indices]), dim=0)

    def backward(
        self,
        task_losses: Mapping[str, Tensor],
        extra: Tensor,
        context: GradientContext,
    ) -> Tensor:
        indices = self._present_indices(context.present)
        if not indices:
            return backward_total(extra)
        losses = self._stacked(task_losses, indices)
        z = self.weights(indices).detach().to(losses)
        index = torch.tensor(indices, device=self.before.device)
        self.before[index] = mean_over_ranks(losses.detach()).to(self.before)

        def objective(values: Tensor) -> Tensor:
            shifted = values + OFFSET
            return (z * shifted.log()).sum() / (z / shifted).sum().detach()

        return backward_linearised(objective, losses, extra)

    def after_step(self, task_losses: Mapping[str, Tensor], present: Tensor) -> None:
        indices = self._present_indices(present)
        if not indices:
            return
        after = mean_over_ranks(self._stacked(task_losses, indices).detach())
        index = torch.tensor(indices, device=self.before.device)
        decrease = (self.before[index] + OFFSET).log() - (after.to(self.before) + OFFSET).log()
        self.optimiser.zero_grad(set_to_none=True)
        with torch.enable_grad():
            z = self.weights(indices)
            z.backward(decrease.to(z))
        self.optimiser.step()
