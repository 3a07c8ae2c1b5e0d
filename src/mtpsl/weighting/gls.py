"""``gls``: the geometric loss strategy (Chennupati, Sistu, Yogamani & Rawashdeh, CVPR
Workshops 2019, "MultiNet++"), LibMTL's ``GLS``: the objective is the geometric mean of the
task losses, ``(prod_k L_k)^(1/K)``, so each task's gradient is weighted by ``GLS / (K L_k)``
(a task whose loss is small relative to the others weighs more)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mtpsl.weighting.base import (
    WEIGHTINGS,
    GradientContext,
    Weighting,
    backward_linearised,
    backward_total,
)


class GLSOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    eps: float = Field(default=1e-12, gt=0.0)
    """Losses are clamped to at least this before the logarithm (a zero loss would give an
    infinite weight)."""


@WEIGHTINGS.register("gls")
class GLS(Weighting):
    """Geometric loss strategy (Chennupati et al. 2019): the geometric mean of the present
    tasks' losses, computed as ``exp(mean_k log L_k)``.

    An absent task (its loss an exact 0) is left out of the mean rather than making the
    product 0, so the result is GLS over the present tasks alone. Not linear in the losses
    (refused under fp16 and with ``train.accumulate``).
    """

    Options = GLSOptions
    options: GLSOptions

    def objective(self, losses: Tensor) -> Tensor:
        """The geometric mean of ``losses`` (the present tasks' values)."""
        return losses.clamp(min=self.options.eps).log().mean().exp()

    def combine(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        return self.objective(torch.stack([task_losses[t] for t in self.task_names]))

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
        return backward_linearised(self.objective, losses, extra)
