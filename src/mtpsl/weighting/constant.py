"""``constant``: fixed per-task weights, ``sum_k w_k L_k`` (torchjd's ``Constant``; the
hand-tuned weights of many papers). Tasks not named keep weight 1; ``uniform`` is the case of
no weights. Linear in the losses, so fp16 is allowed; an absent task's loss is an exact 0."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mtpsl.core.errors import ConfigError
from mtpsl.weighting.base import WEIGHTINGS, Weighting, weighted_sum


class ConstantOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    weights: dict[str, float] = Field(default_factory=dict)
    """Weight per task name (e.g. ``{semantic: 1.0, depth: 2.0}``); unnamed tasks get 1."""


@WEIGHTINGS.register("constant")
class Constant(Weighting):
    """Constant weights from the config (torchjd's Constant): sum_k w_k L_k."""

    Options = ConstantOptions
    options: ConstantOptions
    linear_in_losses = True
    weights: Tensor

    def __init__(self, task_names: Sequence[str], options: BaseModel | None = None) -> None:
        super().__init__(task_names, options)
        unknown = sorted(set(self.options.weights) - set(self.task_names))
        if unknown:
            raise ConfigError(f"method.weighting_options.weights: unknown task(s) {unknown} "
                              f"(the run's tasks: {', '.join(self.task_names)})")
        values = [self.options.weights.get(t, 1.0) for t in self.task_names]
        self.register_buffer("weights", torch.tensor(values), persistent=False)

    def combine(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        return weighted_sum(self.weights, task_losses, self.task_names)
