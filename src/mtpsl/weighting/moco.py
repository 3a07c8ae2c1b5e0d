"""``moco``: multi-objective gradient correction (Fernando, Shen, Liu, Chaudhury, Murugesan &
Chen, "Mitigating Gradient Bias in Multi-objective Learning: A Provably Convergent Approach",
ICLR 2023), in the form of LibMTL's ``MoCo``.

MGDA's weights are biased when computed from the same noisy batch as the gradients they
combine; MoCo tracks every task's gradient with a moving average ``y_k`` and moves the
weights by one step per batch. Each batch: the task gradient is rescaled to the loss's size,
``g_k <- L_k g_k / ||g_k||``; ``y_k <- y_k - beta_t (y_k - g_k)``;
``lambda <- softmax(lambda - gamma_t (Y Y' + rho I) lambda)``; the shared update is
``Y' lambda`` (heads: the plain sum), with ``beta_t = beta / t^beta_sigma`` and likewise
``gamma_t``. The paper projects lambda onto the simplex; LibMTL's softmax is kept, and so are
its defaults (beta 0.5, gamma 0.1, both decaying as t^-0.5, rho 0), read from its source
from memory this time: check them before relying on exact numbers.

Partial labels: every task has its own tracked gradient and step count, touched only when it
is present; lambda is simplex state over all tasks, read and written for the present ones as
:mod:`mtpsl.weighting.simplex_state` says. The tracked gradients are T copies of the shared
gradient's size, held (and checkpointed) with the strategy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mtpsl.weighting.base import WEIGHTINGS
from mtpsl.weighting.gradient import GradientRowsWeighting
from mtpsl.weighting.simplex_state import read_simplex, write_simplex


class MoCoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    beta: float = Field(default=0.5, gt=0.0, le=1.0)
    """Rate of the tracked gradients."""
    beta_sigma: float = Field(default=0.5, ge=0.0)
    """Its decay with the task's step count, ``beta / t^beta_sigma``."""
    gamma: float = Field(default=0.1, gt=0.0)
    """Step size of the weights."""
    gamma_sigma: float = Field(default=0.5, ge=0.0)
    """Its decay, ``gamma / t^gamma_sigma`` (t: the strategy's step count)."""
    rho: float = Field(default=0.0, ge=0.0)
    """l2 regularisation of the weights."""


@WEIGHTINGS.register("moco")
class MoCo(GradientRowsWeighting):
    """MoCo (Fernando et al., ICLR 2023): tracked task gradients, weights stepped per batch."""

    Options = MoCoOptions
    options: MoCoOptions
    weights: Tensor
    steps: Tensor
    step: Tensor

    def __init__(self, task_names: Sequence[str], options: BaseModel | None = None) -> None:
        super().__init__(task_names, options)
        k = len(self.task_names)
        self.register_buffer("weights", torch.full((k,), 1.0 / k, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros(k, dtype=torch.long))
        """Per task: the tracked gradient's count."""
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        """The weights' count."""

    def update(self, grads: Tensor, losses: Tensor, tasks: Sequence[int]
               ) -> tuple[Tensor, Tensor | None]:
        rows = self.rows_like(grads)
        o = self.options
        index = torch.tensor(list(tasks), device=self.steps.device)
        self.steps[index] += 1
        self.step += 1
        t = self.steps[index].to(grads)
        scaled = grads / (grads.norm(dim=1, keepdim=True) + 1e-8) * losses.detach()[:, None]
        tracked = rows[index]
        tracked = tracked - (o.beta / t ** o.beta_sigma)[:, None] * (tracked - scaled)
        rows[index] = tracked
        lam_np, mass = read_simplex(self.weights, tasks)
        lam = torch.from_numpy(lam_np).to(grads)
        gram = tracked @ tracked.T + o.rho * torch.eye(len(tasks), dtype=grads.dtype,
                                                         device=grads.device)
        rate = o.gamma / float(self.step) ** o.gamma_sigma
        lam = torch.softmax(lam - rate * (gram @ lam), dim=0)
        write_simplex(self.weights, tasks, lam.double().cpu().numpy(), mass)
        return torch.ones_like(losses), lam @ tracked - grads.sum(0)
