"""``db_mtl``: dual-balancing multi-task learning (Lin et al., "Dual-Balancing for
Multi-Task Learning", 2023).

Two balances. Loss scale: every task's loss enters as ``log(L_k + 1e-8)``, so its gradient
is ``g_k / (L_k + 1e-8)``. Gradient magnitude: every task keeps a moving average ``m_k`` of
its log-loss gradient of the shared parameters, ``m_k <- g + (beta / t_k^sigma) (m_k - g)``
(``t_k`` the task's own step count), and the shared update is
``sum_k (max_j ||m_j|| / ||m_k||) m_k``: every task pulls as hard as the strongest one. The
heads get the gradient of ``sum_k log(L_k + 1e-8)``. The authors' LibMTL code is the
reference for the form; its defaults (beta 0.9, sigma 0) were not checked this time against
that code (it is not in LibMTL's PyPI release), so treat them as a starting point.

Partial labels: a batch updates the present tasks' averages and step counts only, and the
update sums over the present tasks, so it is DB-MTL on the present tasks alone; an absent
task's average waits untouched. Cost: the averages are T copies of the shared gradient,
held (and checkpointed) with the strategy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mtpsl.weighting.base import WEIGHTINGS
from mtpsl.weighting.gradient import GradientRowsWeighting

LOG_EPS = 1e-8


class DBMTLOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    beta: float = Field(default=0.9, ge=0.0, le=1.0)
    """Weight of the past in the gradient averages."""
    sigma: float = Field(default=0.0, ge=0.0)
    """Decay of that weight with the task's step count, ``beta / t^sigma``."""


@WEIGHTINGS.register("db_mtl")
class DBMTL(GradientRowsWeighting):
    """DB-MTL (Lin et al. 2023): log losses; averaged task gradients scaled to the largest."""

    Options = DBMTLOptions
    options: DBMTLOptions
    steps: Tensor

    def __init__(self, task_names: Sequence[str], options: BaseModel | None = None) -> None:
        super().__init__(task_names, options)
        self.register_buffer("steps", torch.zeros(len(self.task_names), dtype=torch.long))

    def combine(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        """Without shared parameters: the sum of the log losses (an absent task's exact 0
        is left out)."""
        losses = torch.stack([task_losses[t] for t in self.task_names])
        return torch.where(losses == 0, 0.0, torch.log(losses + LOG_EPS)).sum()

    def update(self, grads: Tensor, losses: Tensor, tasks: Sequence[int]
               ) -> tuple[Tensor, Tensor | None]:
        averages = self.rows_like(grads)
        heads = 1.0 / (losses.detach() + LOG_EPS)
        index = torch.tensor(list(tasks), device=self.steps.device)
        self.steps[index] += 1
        keep = self.options.beta / self.steps[index].to(grads.dtype) ** self.options.sigma
        log_grads = heads[:, None] * grads
        mean = log_grads + keep.to(grads.device)[:, None] * (averages[index] - log_grads)
        averages[index] = mean
        norms = torch.linalg.vector_norm(mean, dim=1)
        scale = norms.max() / (norms + LOG_EPS)
        return heads, scale @ mean - heads @ grads
