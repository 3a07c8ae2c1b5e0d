"""Loss-weighting strategies: how per-task losses become the gradient that is applied.

Applied outside the methods (a method returns per-task losses; see mtpsl.methods.base), so any
method combines with any strategy. A strategy owns the backward pass because several of them
(GradNorm, MGDA, PCGrad, CAGrad) act on per-task gradients rather than on a weighted sum. A
strategy may hold learnable parameters (optimised with the model, or in its own optimiser
group) and must cope with a task absent from a batch: its loss is then an exact 0 that does
not depend on the parameters, and the strategy must neither divide by it nor let it disturb
its state.

Adding a strategy: subclass :class:`Weighting`, set ``Options`` if it takes any, register it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn

from .errors import ConfigError
from .optim import OptimGroup
from .registry import Registry

WEIGHTINGS: Registry[type[Weighting]] = Registry("weighting")


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Weighting(nn.Module):
    """Base class: a weighted sum (override :meth:`combine`) or a gradient rule (override
    :meth:`backward`)."""

    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, task_names: Sequence[str], options: BaseModel | None = None) -> None:
        super().__init__()
        self.task_names = tuple(task_names)
        self.options = options if options is not None else self.Options()

    def combine(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def backward(
        self,
        task_losses: Mapping[str, Tensor],
        extra: Tensor,
        shared: Sequence[nn.Parameter],
        present: Tensor,
    ) -> Tensor:
        """Backpropagate the training objective; return the (detached) total for logging.

        ``extra`` is the sum of the method's already-weighted extra terms (consistency,
        adversarial...); ``shared`` lists the parameters every task's loss flows through, in
        forward order (empty for single-task learning), for gradient-based strategies;
        ``present`` is bool ``[T]`` (``task_names`` order, on the device): which tasks have at
        least one labelled image in this batch.
        """
        total = self.combine(task_losses) + extra
        total.backward()
        return total.detach()

    def end_epoch(self, task_means: Mapping[str, float]) -> None:
        """Hook called with each task's mean training loss over the epoch (DWA uses it)."""

    def optimizer_groups(self) -> list[OptimGroup]:
        """Groups with their own optimiser; parameters in none of them join the main group."""
        return []


@WEIGHTINGS.register("uniform")
class Uniform(Weighting):
    """Equal weights: the plain sum of the task losses (Eq. 1 of paper 001)."""

    def combine(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        return torch.stack([task_losses[t] for t in self.task_names]).sum()


def build_weighting(
    name: str, task_names: Sequence[str], options: Mapping[str, Any] | None = None
) -> Weighting:
    """Registry lookup + option validation, with errors that name the config key."""
    try:
        cls = WEIGHTINGS.get(name)
    except KeyError as err:
        raise ConfigError(f"method.weighting: {err.args[0]}") from None
    try:
        parsed = cls.Options.model_validate(dict(options or {}))
    except ValidationError as err:
        details = "; ".join(
            f"method.weighting_options.{'.'.join(map(str, e['loc']))}: {e['msg']}"
            for e in err.errors()
        )
        allowed = ", ".join(cls.Options.model_fields) or "(none)"
        raise ConfigError(f"{details} (weighting {name!r} accepts: {allowed})") from None
    return cls(task_names, parsed)
