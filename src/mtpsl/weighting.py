"""Loss-weighting strategies: how per-task losses become the one loss that is minimised.

Applied outside the methods (a method returns per-task losses; see mtpsl.methods.base), so any
method combines with any strategy. A strategy may hold learnable parameters (they are
optimised with the model) and must cope with a task absent from a batch (its loss is 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .registry import Registry

WEIGHTINGS: Registry[type[Weighting]] = Registry("weighting")


class Weighting(nn.Module):
    def __init__(self, task_names: Sequence[str]) -> None:
        super().__init__()
        self.task_names = tuple(task_names)

    def combine(self, task_losses: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError


@WEIGHTINGS.register("uniform")
class Uniform(Weighting):
    """Equal weights: the plain sum of the task losses (Eq. 1 of paper 001)."""

    def combine(self, task_losses: dict[str, Tensor]) -> Tensor:
        return torch.stack([task_losses[t] for t in self.task_names]).sum()
