"""``stch``: smooth Tchebycheff scalarisation (Lin et al., "Smooth
Tchebycheff Scalarization for Multi-Objective Optimization", ICML 2024), in the form of the
authors' multi-task code (LibMTL's ``STCH``).

A loss-level method. During ``warmup_epochs`` the objective is ``sum_k log L_k``, and in the
last warm-up epoch every task's mean loss is recorded as its nadir ``z_k``. Afterwards it is
``K mu log sum_k exp((log L_k - log z_k) / mu)``: a smooth maximum of the log improvement
ratios, so the task furthest behind its own starting level gets most of the weight; ``mu``
sets how smooth (towards the plain sum of log ratios as it grows, the hard maximum as it
shrinks). Epochs are counted by the ``end_epoch`` hook.

Partial labels: the sums run over the present tasks (K counts those with a nadir), and a
task's nadir is the mean of its losses over the batches in which it was present; a task never
labelled in the last warm-up epoch keeps its log loss in the objective and records its nadir
in the first later epoch in which it is. The defaults (mu 1, 4 warm-up epochs) follow our
reading of the authors' code and were not re-checked against it this time: tune them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mtpsl.core.distributed import mean_over_ranks
from mtpsl.weighting.base import (
    WEIGHTINGS,
    GradientContext,
    Weighting,
    backward_linearised,
    backward_total,
)

LOG_EPS = 1e-20


class STCHOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    mu: float = Field(default=1.0, gt=0.0)
    """Smoothing of the maximum."""
    warmup_epochs: int = Field(default=4, ge=1)
    """Epochs of the plain sum of log losses; the last one records the nadir."""


@WEIGHTINGS.register("stch")
class STCH(Weighting):
    """STCH (Lin et al., ICML 2024): a smooth maximum of the log losses over their nadir."""

    Options = STCHOptions
    options: STCHOptions
    epoch: Tensor
    loss_sums: Tensor
    loss_counts: Tensor
    nadir: Tensor

    def __init__(self, task_names: Sequence[str], options: BaseModel | None = None) -> None:
        super().__init__(task_names, options)
        k = len(self.task_names)
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))
        self.register_buffer("loss_sums", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("loss_counts", torch.zeros(k, dtype=torch.long))
        self.register_buffer("nadir", torch.zeros(k, dtype=torch.float64))
        """0 until recorded."""

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
        index = torch.tensor(indices, device=self.nadir.device)
        nadir = self.nadir[index]
        if int(self.epoch) >= self.options.warmup_epochs - 1:  # record the nadir
            recording = nadir == 0
            values = mean_over_ranks(losses.detach()).double().to(nadir.device)
            self.loss_sums[index] += torch.where(recording, values, 0.0)
            self.loss_counts[index] += recording.long()
        ready = (nadir > 0).to(losses.device)
        log_nadir = torch.log(nadir.to(losses) + LOG_EPS)
        count, mu = int(ready.sum()), self.options.mu

        def objective(values: Tensor) -> Tensor:
            logs = torch.log(values + LOG_EPS)
            total = torch.where(ready, 0.0, logs).sum()
            if count:
                ratios = torch.where(ready, (logs - log_nadir) / mu, -math.inf)
                total = total + count * mu * torch.logsumexp(ratios, dim=0)
            return total

        return backward_linearised(objective, losses, extra)

    def end_epoch(self, task_means: Mapping[str, float]) -> None:
        seen = (self.loss_counts > 0) & (self.nadir == 0)
        self.nadir[seen] = self.loss_sums[seen] / self.loss_counts[seen]
        self.epoch += 1
