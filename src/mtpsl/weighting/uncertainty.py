"""``uncertainty``: homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from mtpsl.weighting.base import WEIGHTINGS, GradientContext, Weighting, backward_total


class UncertaintyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    regulariser: Literal["half", "full"] = "half"
    """half: Kendall et al.'s ``s/2`` term (default); full: ``s`` as the TaskTransferNet code."""


@WEIGHTINGS.register("uncertainty")
class Uncertainty(Weighting):
    """Homoscedastic uncertainty (Kendall et al. 2018): ``sum_k 0.5 exp(-s_k) L_k + c s_k``.

    ``s_k`` is a learned log-variance per task (init 0, in the main optimiser group), ``c`` is
    1/2 (``half``, the paper's form; the optimum is ``s = log L``) or 1 (``full``, as in the
    TaskTransferNet code; optimum ``s = log(L / 2)``). An absent task contributes no term at
    all, so its ``s`` gets no gradient.
    """

    Options = UncertaintyOptions
    options: UncertaintyOptions

    def __init__(self, task_names: Sequence[str], options: BaseModel | None = None) -> None:
        super().__init__(task_names, options)
        self.log_vars = nn.ParameterList(nn.Parameter(torch.zeros(())) for _ in self.task_names)
        self.reg = 0.5 if self.options.regulariser == "half" else 1.0

    def objective(self, task_losses: Mapping[str, Tensor], indices: Sequence[int]) -> Tensor:
        terms = [
            0.5 * torch.exp(-self.log_vars[i]) * task_losses[self.task_names[i]]
            + self.reg * self.log_vars[i]
            for i in indices
        ]
        return torch.stack(terms).sum() if terms else self.log_vars[0].new_zeros(()).detach()

    def combine(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        return self.objective(task_losses, range(len(self.task_names)))

    def backward(
        self,
        task_losses: Mapping[str, Tensor],
        extra: Tensor,
        context: GradientContext,
    ) -> Tensor:
        indices = self._present_indices(context.present)
        return backward_total(self.objective(task_losses, indices) + extra)
