"""``uniform``: the plain sum of the task losses (equal weighting, LibMTL's EW)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from mtpsl.weighting.base import WEIGHTINGS, Weighting, plain_sum


@WEIGHTINGS.register("uniform")
class Uniform(Weighting):
    """Equal weights: the plain sum of the task losses (Eq. 1 of paper 001)."""

    linear_in_losses = True

    def combine(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        return plain_sum(task_losses, self.task_names)
