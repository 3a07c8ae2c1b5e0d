"""``gradnorm``: gradient normalisation (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mtpsl.core.distributed import mean_over_ranks
from mtpsl.core.param_groups import OptimGroup
from mtpsl.weighting.base import (
    WEIGHTINGS,
    GradientContext,
    Weighting,
    backward_total,
    weighted_sum,
)


class GradNormOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    alpha: float = Field(default=0.16, ge=0.0)
    """Restoring-force strength (0.16 in the TaskTransferNet code)."""
    lr: float = Field(default=0.025, gt=0.0)
    """Learning rate of the weights' own Adam (constant, no schedule)."""


@WEIGHTINGS.register("gradnorm")
class GradNorm(Weighting):
    """GradNorm (Chen et al. 2018): learn task weights that balance gradient magnitudes.

    Per step, over the present tasks: ``G_k = ||d(w_k L_k)/dW||`` with ``W`` the last 4-d shared
    tensor (the last shared conv's weight), ``r_k = (L_k / L_k(0)) / mean_j(L_j / L_j(0))``
    with ``L_k(0)`` the task's first observed (present) loss, and
    ``L_grad = sum_k |G_k - detach(mean(G) r_k^alpha)|`` gives the weights' gradient; the model
    gets the gradient of ``sum_k w_k L_k`` (weights held constant). The weights' optimiser
    steps after this call returns, so the renormalisation to ``sum w = T`` happens at the
    start of the next call (:meth:`current_weights` shows the renormalised values). Absent
    tasks are left out of ``mean(G)`` and ``L_grad`` (their weight gets no gradient). Without
    a shared 4-d tensor (single-task learning) it is the plain weighted sum and nothing is
    learned.
    """

    Options = GradNormOptions
    options: GradNormOptions
    initial_losses: Tensor
    observed: Tensor

    def __init__(self, task_names: Sequence[str], options: BaseModel | None = None) -> None:
        super().__init__(task_names, options)
        self.weights = nn.ParameterList(nn.Parameter(torch.ones(())) for _ in self.task_names)
        n = len(self.task_names)
        self.register_buffer("initial_losses", torch.zeros(n))
        self.register_buffer("observed", torch.zeros(n, dtype=torch.bool))

    def optimizer_groups(self) -> list[OptimGroup]:
        return [
            OptimGroup(
                "gradnorm",
                list(self.weights),
                lr=self.options.lr,
                optimizer="adam",
                betas=(0.9, 0.999),
                schedule="step",
                gamma=1.0,
                weight_decay=0.0,
            )
        ]

    @torch.no_grad()
    def renormalise(self) -> None:
        """Rescale the weights to sum to the number of tasks."""
        total = torch.stack(list(self.weights)).sum()
        for w in self.weights:
            w.mul_(len(self.weights) / total)

    def current_weights(self) -> Tensor:
        """The weights as the next step will use them (renormalised)."""
        w = torch.stack([p.detach() for p in self.weights])
        return w * len(w) / w.sum()

    def combine(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        return weighted_sum(self.current_weights(), task_losses, self.task_names)

    def backward(
        self,
        task_losses: Mapping[str, Tensor],
        extra: Tensor,
        context: GradientContext,
    ) -> Tensor:
        self.renormalise()
        losses = torch.stack([task_losses[t] for t in self.task_names])
        weights = torch.stack([p.detach() for p in self.weights])
        total = (weights * losses).sum() + extra
        layer = _last_conv_weight(context.shared)
        indices = self._present_indices(context.present)
        if layer is None or not indices:
            return backward_total(total)
        values = mean_over_ranks(losses.detach())  # under torchrun: the global batch's
        self._observe(values, context.present)
        grads = self._weight_gradients(losses, values, layer, indices)
        result = backward_total(total)
        for i, g in zip(indices, grads, strict=True):
            self.weights[i].grad = g
        return result

    @torch.no_grad()
    def _observe(self, losses: Tensor, present: Tensor) -> None:
        """Record each task's first observed loss (device-side, no sync)."""
        first = present.to(losses.device) & ~self.observed
        self.initial_losses.copy_(torch.where(first, losses, self.initial_losses))
        self.observed |= first

    def _weight_gradients(self, losses: Tensor, values: Tensor, layer: Tensor,
                          indices: list[int]) -> tuple:
        norms = torch.stack([
            mean_over_ranks(_grad_or_zero(
                torch.autograd.grad(losses[i], layer, retain_graph=True, allow_unused=True)[0],
                layer)).norm()
            for i in indices
        ])
        params = [self.weights[i] for i in indices]
        g_norms = torch.stack(params).abs() * norms
        relative = values[indices] / self.initial_losses[indices].clamp_min(1e-12)
        ratios = relative / relative.mean().clamp_min(1e-12)
        target = (g_norms.mean() * ratios.pow(self.options.alpha)).detach()
        return torch.autograd.grad((g_norms - target).abs().sum(), params)


def _last_conv_weight(shared: Sequence[nn.Parameter]) -> nn.Parameter | None:
    convs = [p for p in shared if p.dim() == 4 and p.requires_grad]
    return convs[-1] if convs else None


def _grad_or_zero(grad: Tensor | None, like: Tensor) -> Tensor:
    return grad.detach() if grad is not None else torch.zeros_like(like)
