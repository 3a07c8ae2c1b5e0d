"""Shared machinery of the gradient rules: per-task gradients of the shared parameters,
their Gram matrix, one coefficient per task (see the package docstring)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from .base import Weighting, backward_total, plain_sum


class GradientWeighting(Weighting):
    """Base of strategies that combine per-task gradients of the shared parameters.

    Subclasses turn the Gram matrix of the present tasks' gradients into coefficients
    ``alpha`` (:meth:`coefficients`); the shared gradient becomes ``sum_k alpha_k g_k`` plus
    the gradient of ``extra``; the other parameters get the gradient of
    ``sum_k h_k L_k + extra`` with ``h = alpha`` if ``heads_follow`` else 1.
    """

    heads_follow: ClassVar[bool] = False

    def combine(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        return plain_sum(task_losses, self.task_names)

    def coefficients(self, gram: np.ndarray, losses: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def backward(
        self,
        task_losses: Mapping[str, Tensor],
        extra: Tensor,
        shared: Sequence[nn.Parameter],
        present: Tensor,
    ) -> Tensor:
        params = [p for p in shared if p.requires_grad]
        indices = self._present_indices(present)
        if not params or not indices:
            return backward_total(self.combine(task_losses) + extra)
        losses = [task_losses[self.task_names[i]] for i in indices]
        grads = torch.stack([flat_grad(loss, params) for loss in losses])
        gram = (grads @ grads.T).double().cpu().numpy()
        values = torch.stack(losses).detach().double().cpu().numpy()
        alpha = torch.as_tensor(
            self.coefficients(gram, values), dtype=grads.dtype, device=grads.device
        )
        heads = alpha if self.heads_follow else torch.ones_like(alpha)
        total = (heads * torch.stack(losses)).sum() + extra
        total.backward()
        if not torch.equal(alpha, heads):
            add_to_grads(params, (alpha - heads) @ grads)
        return total.detach()


def flat_grad(loss: Tensor, params: Sequence[nn.Parameter]) -> Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


@torch.no_grad()
def add_to_grads(params: Sequence[nn.Parameter], flat: Tensor) -> None:
    offset = 0
    for p in params:
        piece = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        if p.grad is None:
            p.grad = piece.clone()
        else:
            p.grad.add_(piece)
