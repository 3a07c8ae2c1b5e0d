"""Shared machinery of the gradient rules: per-task gradients of the shared parameters,
their Gram matrix, one coefficient per task (see the package docstring)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np
import torch
from pydantic import BaseModel
from torch import Tensor, nn

from mtpsl.core.distributed import group_size, mean_over_ranks
from mtpsl.weighting.base import GradientContext, Weighting, backward_total, plain_sum


class GradientWeighting(Weighting):
    """Base of strategies that combine per-task gradients of the shared parameters.

    Subclasses turn the Gram matrix of the present tasks' gradients into coefficients
    ``alpha`` (:meth:`coefficients`); the shared gradient becomes ``sum_k alpha_k g_k`` plus
    the gradient of ``extra``; the other parameters get the gradient of
    ``sum_k h_k L_k + extra`` with ``h = alpha`` if ``heads_follow`` else 1.

    With ``gradients = "representation"`` the ``g_k`` are the gradients of the losses with
    respect to the shared representation ``z`` the heads read (one backward through the heads
    per task, and a Gram matrix of ``z``'s size rather than the shared parameters'); the
    shared parameters then get ``J^T sum_k alpha_k g_k`` (``J`` = dz/dtheta), which is
    ``sum_k alpha_k dL_k/dtheta`` exactly: only ``alpha`` is approximate (Sener & Koltun's
    MGDA-UB bound). Under torchrun the Gram matrix is the global batch's: each process's
    ``z`` holds its own images and the global loss is the mean of the processes' losses, so
    the global Gram matrix is ``sum_r G_r / world^2 = mean_over_ranks(G_local) / world``.

    With ``gradients = "gramian"`` the Gram matrix of the shared parameters' gradients comes
    from torchjd's autogram engine (:mod:`.gramian`) without the gradients; the shared
    parameters then get ``sum_k alpha_k dL_k/dtheta`` from a backward pass of
    ``sum_k alpha_k L_k`` restricted to them (one pass in all when the heads follow alpha).
    """

    heads_follow: ClassVar[bool] = False

    def combine(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        return plain_sum(task_losses, self.task_names)

    def coefficients(self, gram: np.ndarray, losses: np.ndarray,
                     tasks: Sequence[int] | None = None) -> np.ndarray:
        """One coefficient per present task from their Gram matrix and loss values; ``tasks``
        are the present tasks' indices in ``task_names`` (for per-task state; None: all)."""
        raise NotImplementedError

    @classmethod
    def supports_representation(cls) -> bool:
        """Strategies that only turn the Gram matrix into coefficients (a subclass with its
        own :meth:`update` works on the gradients themselves)."""
        return cls.update is GradientWeighting.update

    def update(self, grads: Tensor, losses: Tensor, tasks: Sequence[int]
               ) -> tuple[Tensor, Tensor | None]:
        """``(h, correction)`` for the present tasks' gradients ``grads`` ``[K, P]``: the
        backward pass runs on ``sum_k h_k L_k``, then ``correction`` (None: nothing) is added to
        the shared parameters' gradient. Here: ``alpha`` from :meth:`coefficients`."""
        heads, alpha = self._weights(grads @ grads.T, losses, tasks)
        return heads, None if torch.equal(alpha, heads) else (alpha - heads) @ grads

    def _weights(self, gram: Tensor, losses: Tensor, tasks: Sequence[int]
                 ) -> tuple[Tensor, Tensor]:
        """``(h, alpha)``: the heads' and the shared gradients' coefficients."""
        values = losses.detach().double().cpu().numpy()
        alpha = self.coefficients(gram.double().cpu().numpy(), values, tasks)
        alpha_t = torch.as_tensor(alpha, dtype=losses.dtype, device=losses.device)
        heads = alpha_t if self.heads_follow else torch.ones_like(alpha_t)
        return heads, alpha_t

    def backward(
        self,
        task_losses: Mapping[str, Tensor],
        extra: Tensor,
        context: GradientContext,
    ) -> Tensor:
        params = [p for p in context.shared if p.requires_grad]
        indices = self._present_indices(context.present)
        if not params or not indices:
            if context.gramian is not None:
                context.gramian.discard()
            return backward_total(self.combine(task_losses) + extra)
        losses = self._stacked(task_losses, indices)
        if self.gradients == "representation":
            if context.representation is None:
                raise ValueError("gradients='representation' needs the shared representation")
            return self._backward_representation(losses, extra, context.representation, indices)
        if self.gradients == "gramian":
            if context.gramian is None:
                raise ValueError("gradients='gramian' needs the shared layers' Gram engine")
            return self._backward_gramian(losses, extra, params, context.gramian(losses), indices)
        grads = torch.stack([flat_grad(loss, params) for loss in losses])
        # under torchrun: the weights come from the global batch's gradients and losses
        heads, correction = self.update(mean_over_ranks(grads), mean_over_ranks(losses), indices)
        total = (heads * losses).sum() + extra  # each process: its share, averaged afterwards
        total.backward()
        if correction is not None:
            add_to_grads(params, correction)
        return total.detach()

    def _backward_representation(self, losses: Tensor, extra: Tensor, z: Tensor,
                                 indices: Sequence[int]) -> Tensor:
        """One backward pass with two roots: ``sum_k h_k L_k + extra``, and ``z`` fed
        ``sum_k (alpha_k - h_k) g_k`` when the shared coefficients differ from the heads'."""
        wide = torch.promote_types(z.dtype, torch.float32)  # a bf16 map's Gram in fp32
        grads = torch.stack([flat_grad(loss, [z]).to(wide) for loss in losses])  # [K, |z|]
        gram = mean_over_ranks(grads @ grads.T) / group_size()
        heads, alpha = self._weights(gram, mean_over_ranks(losses), indices)
        total = (heads * losses).sum() + extra
        roots, seeds = [total], [torch.ones_like(total)]
        if not torch.equal(alpha, heads):
            roots.append(z)
            seeds.append(((alpha - heads).to(wide) @ grads).view_as(z).to(z.dtype))
        torch.autograd.backward(roots, seeds)
        return total.detach()

    def _backward_gramian(self, losses: Tensor, extra: Tensor, params: Sequence[nn.Parameter],
                          gram: Tensor, indices: Sequence[int]) -> Tensor:
        """``sum_k h_k L_k + extra`` backward, after ``sum_k (alpha_k - h_k) L_k`` backward
        into the shared parameters alone when the shared coefficients differ from the heads'
        (the parameter form's correction, without the gradients)."""
        heads, alpha = self._weights(gram, losses, indices)
        if not torch.equal(alpha, heads):
            correction = ((alpha - heads) * losses).sum()
            torch.autograd.backward(correction, inputs=list(params), retain_graph=True)
        total = (heads * losses).sum() + extra
        total.backward()
        return total.detach()


def task_indices(tasks: Sequence[int] | None, count: int) -> list[int]:
    """``coefficients``' ``tasks`` as a list (None: all ``count`` tasks, in order)."""
    return list(range(count)) if tasks is None else list(tasks)


class JacobianWeighting(GradientWeighting):
    """Base of rules whose shared update is not a combination of the task gradients
    (GradDrop's sign masks, ConFIG's pseudo-inverse): :meth:`aggregate` maps the present
    tasks' gradients ``[K, P]`` to the update ``[P]``; the heads get the plain sum."""

    def aggregate(self, grads: Tensor, losses: Tensor, tasks: Sequence[int]) -> Tensor:
        raise NotImplementedError

    def update(self, grads: Tensor, losses: Tensor, tasks: Sequence[int]
               ) -> tuple[Tensor, Tensor | None]:
        return torch.ones_like(losses), self.aggregate(grads, losses, tasks) - grads.sum(0)


class GradientRowsWeighting(GradientWeighting):
    """Base of rules that keep one shared-gradient-sized row per task (DB-MTL's, ExcessMTL's
    and MoCo's running sums): ``rows`` ``[T, P]``, sized by the first step and saved as extra
    state (a buffer would be shape-checked against the unsized one when a run resumes)."""

    def __init__(self, task_names: Sequence[str], options: BaseModel | None = None) -> None:
        super().__init__(task_names, options)
        self.rows = torch.zeros(len(self.task_names), 0)

    def get_extra_state(self) -> dict[str, Tensor]:
        return {"rows": self.rows}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        self.rows = state["rows"].clone()

    def rows_like(self, grads: Tensor) -> Tensor:
        """``rows`` on the gradients' device and dtype (zeros before the first step)."""
        if self.rows.shape[1] != grads.shape[1]:
            self.rows = grads.new_zeros(len(self.task_names), grads.shape[1])
        self.rows = self.rows.to(grads)
        return self.rows


def flat_grad(loss: Tensor, params: Sequence[Tensor]) -> Tensor:
    """``d loss / d params`` flattened into one vector (zeros where a tensor is unused)."""
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
