"""``rlw``: random loss weighting (Lin, Ye, Xu, Shi & Zhang, "Reasonable Effectiveness of
Random Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022).

Every step draws ``z ~ N(0, I)`` (one value per task) and weights the losses by
``softmax(z)``, as LibMTL's ``RLW`` does (its default, the normal distribution). With partial
labels the softmax runs over the tasks present in the batch only, so the result equals RLW on
the present tasks alone, and all T values are drawn every step, so the stream (the strategy's
own generator, saved in its ``state_dict``) does not depend on which tasks were present.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from mtpsl.weighting.base import WEIGHTINGS, GradientContext, SeededDraws, Weighting, backward_total


class RLWOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    seed: int = 0
    """Seed of the strategy's own generator for the weights."""


@WEIGHTINGS.register("rlw")
class RLW(SeededDraws, Weighting):
    """Random loss weighting (Lin et al., TMLR 2022): softmax of fresh normal draws per step."""

    Options = RLWOptions
    options: RLWOptions
    linear_in_losses = True  # fixed weights within a step
    draws_per_step = True

    def __init__(self, task_names: Sequence[str], options: BaseModel | None = None) -> None:
        super().__init__(task_names, options)
        self.seed_generator(self.options.seed)
        self.last_weights = torch.zeros(len(self.task_names))
        """The weights of the last step (0 for absent tasks), for logging and tests."""

    def draw(self, present: Tensor) -> Tensor:
        """This step's weights ``[T]``: softmax over the present tasks' draws, 0 elsewhere."""
        z = torch.randn(len(self.task_names), generator=self.generator, dtype=torch.float64)
        mask = present.detach().cpu().bool()
        weights = torch.zeros_like(z)
        if mask.any():
            weights[mask] = torch.softmax(z[mask], dim=0)
        return weights.float()

    def backward(
        self,
        task_losses: Mapping[str, Tensor],
        extra: Tensor,
        context: GradientContext,
    ) -> Tensor:
        losses = torch.stack([task_losses[t] for t in self.task_names])
        self.last_weights = self.draw(context.present)
        return backward_total((self.last_weights.to(losses.device) * losses).sum() + extra)
