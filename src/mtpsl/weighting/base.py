"""The weighting contract: :class:`Weighting` (owns the backward pass), the registry and
``build_weighting`` (see the package docstring)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn

from mtpsl.core.distributed import mean_over_ranks
from mtpsl.core.errors import ConfigError
from mtpsl.core.param_groups import OptimGroup
from mtpsl.core.registry import Registry
from mtpsl.weighting.gramian import SharedGramian

WEIGHTINGS: Registry[type[Weighting]] = Registry("weighting")


@dataclass(frozen=True)
class GradientContext:
    """What a weighting's backward pass may differentiate besides the losses (the loop fills it)."""

    present: Tensor
    """bool [T] in ``task_names`` order, on the device: tasks with a labelled image in the batch."""
    shared: Sequence[nn.Parameter] = ()
    """The parameters every task's loss flows through, in forward order (empty for STL)."""
    representation: Tensor | None = None
    """The model's ``features["shared"]`` (``method.weighting_gradients=representation``)."""
    gramian: SharedGramian | None = None
    """The shared layers' Gram engine (``method.weighting_gradients=gramian``)."""


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class Weighting(nn.Module):
    """Base class: a weighted sum (override :meth:`combine`) or a gradient rule (override
    :meth:`backward`)."""

    Options: ClassVar[type[BaseModel]] = NoOptions
    linear_in_losses: ClassVar[bool] = False
    """True when the gradient is linear in the task losses within a step (a fixed weighted
    sum), so scaling the losses by fp16's loss scale scales the gradient alike: only such
    strategies may run under ``train.amp=fp16``."""
    draws_per_step: ClassVar[bool] = False
    """True when every step draws new random weights (RLW): summed micro-batches
    (``train.accumulate``) would average several draws, not take one larger step."""
    gradients: str = "parameters"
    """What a gradient strategy differentiates (``method.weighting_gradients``): with
    ``representation`` the loop puts the model's ``features["shared"]`` in the
    :class:`GradientContext`'s ``representation``; with ``gramian`` it puts the Gram engine of
    the shared layers (:class:`~mtpsl.weighting.gramian.SharedGramian`) in its ``gramian``;
    only strategies whose :meth:`supports_representation` is true accept either."""
    wants_losses_after_step: ClassVar[bool] = False
    """True when the strategy learns from how the step changed the batch's losses (FAMO): the
    loop then evaluates them again after the optimiser step (no gradient, BatchNorm
    statistics kept) and calls :meth:`after_step`."""

    def __init__(self, task_names: Sequence[str], options: BaseModel | None = None) -> None:
        super().__init__()
        self.task_names = tuple(task_names)
        self.options = options if options is not None else self.Options()

    @classmethod
    def supports_representation(cls) -> bool:
        """True when the strategy needs only the Gram matrix of the task gradients, so it can
        work from the shared representation's gradients or from the Gram engine."""
        return False

    def combine(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def backward(
        self,
        task_losses: Mapping[str, Tensor],
        extra: Tensor,
        context: GradientContext,
    ) -> Tensor:
        """Backpropagate the training objective; return the (detached) total for logging.

        ``extra`` is the sum of the method's already-weighted extra terms (consistency,
        adversarial...); ``context`` holds which tasks are present and what a gradient-based
        strategy differentiates (the shared parameters, or their representation or Gram
        engine).
        """
        return backward_total(self.combine(task_losses) + extra)

    def end_epoch(self, task_means: Mapping[str, float]) -> None:
        """Hook called with each task's mean training loss over the epoch (DWA uses it)."""

    def optimizer_groups(self) -> list[OptimGroup]:
        """Groups with their own optimiser; parameters in none of them join the main group."""
        return []

    def trained_parameters(self) -> list[nn.Parameter]:
        """The parameters the loop's optimisers train (default: all); a strategy that updates
        some itself (FAMO's logits) leaves them out."""
        return list(self.parameters())

    def after_step(self, task_losses: Mapping[str, Tensor], present: Tensor) -> None:
        """With ``wants_losses_after_step``: the batch's task losses after the step."""

    def _present_indices(self, present: Tensor) -> list[int]:
        """Indices of the present tasks (reads ``present`` on the host: one sync)."""
        return [i for i, flag in enumerate(present.tolist()) if flag]

    def _stacked(self, task_losses: Mapping[str, Tensor], indices: Sequence[int]) -> Tensor:
        """The losses of the tasks at ``indices``, as one ``[K]`` tensor."""
        return torch.stack([task_losses[self.task_names[i]] for i in indices])


class SeededDraws:
    """Mixin of a strategy that draws random numbers (PCGrad's orders, RLW's weights, GradDrop's
    masks, GradVac's orders) from its own generator, seeded by ``options.seed``, so the draws do
    not depend on the global RNG. Its state is the module's extra state (``state_dict``), so a
    resumed run draws the same numbers."""

    generator: torch.Generator

    def seed_generator(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def get_extra_state(self) -> Tensor:
        return self.generator.get_state()

    def set_extra_state(self, state: Tensor) -> None:
        self.generator.set_state(state.cpu())


def backward_total(total: Tensor) -> Tensor:
    """Backward ``total`` when anything requires a gradient; return it detached."""
    if total.requires_grad:
        total.backward()
    return total.detach()


def backward_linearised(objective: Callable[[Tensor], Tensor], losses: Tensor,
                        extra: Tensor) -> Tensor:
    """Backpropagate ``objective(losses) + extra`` for an objective nonlinear in the losses
    ``[K]``, with its coefficients taken at the processes' mean losses.

    ``c = d objective / d L`` at ``L = mean_over_ranks(losses)``, then the backward pass of
    ``sum_k c_k L_k + extra``: in one process this is the gradient of the objective itself
    (the chain rule); under torchrun the averaged gradient is the objective's gradient at the
    global batch's losses, whatever the number of processes. Returns the objective's value
    (at the mean losses) plus ``extra``, detached.
    """
    values = mean_over_ranks(losses.detach()).detach().requires_grad_(True)
    with torch.enable_grad():
        total = objective(values)
    (coefficients,) = torch.autograd.grad(total, values, allow_unused=True)
    if coefficients is None:  # the objective does not depend on the losses
        coefficients = torch.zeros_like(values)
    backward_total((coefficients * losses).sum() + extra)
    return total.detach() + extra.detach()


def plain_sum(task_losses: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
    return torch.stack([task_losses[t] for t in names]).sum()


def weighted_sum(
    weights: Tensor, task_losses: Mapping[str, Tensor], names: Sequence[str]
) -> Tensor:
    """``sum_k weights[k] * L_k`` in ``names`` order."""
    return torch.stack([weights[i] * task_losses[t] for i, t in enumerate(names)]).sum()


def build_weighting(
    name: str, task_names: Sequence[str], options: Mapping[str, Any] | None = None,
    gradients: str | None = None,
) -> Weighting:
    """Registry lookup + option validation, with errors that name the config key.
    ``gradients`` is ``method.weighting_gradients`` (None: the strategy's default)."""
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
    weighting = cls(task_names, parsed)
    if gradients is not None and gradients != weighting.gradients:
        if gradients in ("representation", "gramian") and not cls.supports_representation():
            able = ", ".join(n for n in WEIGHTINGS.names()
                             if WEIGHTINGS.get(n).supports_representation())
            raise ConfigError(
                f"method.weighting_gradients: {gradients!r} needs a strategy that weights "
                f"the task gradients by coefficients from their Gram matrix; {name!r} does "
                f"not. Allowed with it: {able}")
        if cls.gradients == "representation":
            raise ConfigError(f"method.weighting_gradients: {name!r} works on the shared "
                              f"representation only (its parameter form has its own name)")
        weighting.gradients = gradients
    return weighting
