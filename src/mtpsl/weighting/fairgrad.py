"""``fairgrad``: fair resource allocation (Ban & Ji, "Fair Resource Allocation in Multi-Task
Learning", ICML 2024), torchjd's ``FairGradWeighting``.

The weights ``w > 0`` solve ``G w = w^(-1/alpha)`` (``G`` the present tasks' Gram matrix):
the alpha-fair allocation of the update's improvement among the tasks. ``alpha = 0`` is the
mean gradient, ``alpha = 1`` proportional fairness (the Nash-MTL weights, without its norm
clip), larger ``alpha`` favours the worst-off task (towards max-min fairness). torchjd solves
it by bounded least squares (scipy). The paper's experiments tune alpha per benchmark; the
default here, 1, is the middle of its range, not a value it prescribes.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mtpsl.weighting.base import WEIGHTINGS
from mtpsl.weighting.jacobian import TorchJDWeighting, torchjd_aggregation


class FairGradOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    alpha: float = Field(default=1.0, ge=0.0)
    """The fairness exponent: 0 mean gradient, 1 proportional fairness, large: max-min."""
    max_iters: int | None = Field(default=None, ge=1)
    """Iterations of the least-squares solve (None: scipy's default, 100 x tasks)."""


@WEIGHTINGS.register("fairgrad")
class FairGrad(TorchJDWeighting):
    """FairGrad (Ban & Ji, ICML 2024): alpha-fair weights, ``G w = w^(-1/alpha)``."""

    Options = FairGradOptions
    options: FairGradOptions

    def build(self) -> Any:
        return torchjd_aggregation().FairGradWeighting(alpha=self.options.alpha,
                                                       max_iters=self.options.max_iters)
