"""``excess_mtl``: robust multi-task learning with excess risks (He et al.,
"Robust Multi-Task Learning with Excess Risks", ICML 2024), as torchjd's
``ExcessMTLWeighting``.

Each task's excess risk is estimated as ``g' H^-1 g`` with an AdaGrad-style diagonal ``H``
(the square root of the task's accumulated squared gradients); after ``warmup_steps`` it is
divided by its mean over the warm-up (with no warm-up, the first estimate is the scale and
is used as is), and the weights take an exponentiated-gradient step,
``lambda <- softmax(log lambda + step_size * excess)``: tasks far from their best get more
weight. The shared update is ``sum_k lambda_k g_k`` (heads: the plain sum). Defaults are
torchjd's (step size 1, no warm-up).

Partial labels: every task has its own accumulated squares, warm-up count and scale, touched
only when it is present; the weights are simplex state over all tasks, read and written for
the present ones as :mod:`mtpsl.weighting.simplex_state` says. The accumulated squares are T
copies of the shared gradient's size, held (and checkpointed) with the strategy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mtpsl.weighting.base import WEIGHTINGS
from mtpsl.weighting.gradient import GradientRowsWeighting
from mtpsl.weighting.simplex_state import read_simplex, write_simplex


class ExcessMTLOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    step_size: float = Field(default=1.0, gt=0.0)
    """Step of the exponentiated-gradient update of the weights (torchjd's default)."""
    warmup_steps: int = Field(default=0, ge=0)
    """Steps (per task) that only collect excess risks for the scale."""


@WEIGHTINGS.register("excess_mtl")
class ExcessMTL(GradientRowsWeighting):
    """ExcessMTL (He et al., ICML 2024): weights follow the tasks' estimated excess risks."""

    Options = ExcessMTLOptions
    options: ExcessMTLOptions
    weights: Tensor
    steps: Tensor
    warmup_sums: Tensor
    scales: Tensor
    scaled: Tensor

    def __init__(self, task_names: Sequence[str], options: BaseModel | None = None) -> None:
        super().__init__(task_names, options)
        k = len(self.task_names)
        self.register_buffer("weights", torch.full((k,), 1.0 / k, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros(k, dtype=torch.long))
        self.register_buffer("warmup_sums", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("scales", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("scaled", torch.zeros(k, dtype=torch.bool))
        """Whether the task's scale is set."""

    def update(self, grads: Tensor, losses: Tensor, tasks: Sequence[int]
               ) -> tuple[Tensor, Tensor | None]:
        squares = self.rows_like(grads)
        index = torch.tensor(list(tasks), device=squares.device)
        squared = grads.detach() ** 2
        squares[index] += squared
        excess = (squared / torch.sqrt(squares[index] + 1e-7)).sum(1)
        alpha = torch.as_tensor(self._step(excess.double().cpu().numpy(), list(tasks)),
                                dtype=grads.dtype, device=grads.device)
        return torch.ones_like(alpha), alpha @ grads - grads.sum(0)

    def _step(self, excess: np.ndarray, tasks: list[int]) -> np.ndarray:
        """The per-task bookkeeping and the weights' update, on the host."""
        lam, mass = read_simplex(self.weights, tasks)
        steps = self.steps.cpu().numpy()[tasks]
        scales = self.scales.cpu().numpy()[tasks]
        scaled = self.scaled.cpu().numpy()[tasks]
        warm = steps < self.options.warmup_steps
        sums = self.warmup_sums.cpu().numpy()[tasks] + np.where(warm, excess, 0.0)
        fresh = ~warm & ~scaled  # the first step after warm-up sets the scale
        with_warmup = self.options.warmup_steps > 0
        scales = np.where(fresh, sums / max(self.options.warmup_steps, 1) if with_warmup
                          else excess, scales)
        relative = np.where(fresh & ~with_warmup, excess, excess / (scales + 1e-7))
        with np.errstate(divide="ignore"):  # a weight that underflowed to 0 stays 0
            logits = np.log(lam) + np.where(warm, 0.0, relative * self.options.step_size)
        if not warm.all():
            lam = np.exp(logits - logits.max())
            lam /= lam.sum()
        index = torch.tensor(tasks)
        self.steps[index] += 1
        self.warmup_sums[index] = torch.from_numpy(sums).to(self.warmup_sums)
        self.scales[index] = torch.from_numpy(scales).to(self.scales)
        self.scaled[index] = torch.from_numpy(~warm | scaled).to(self.scaled.device)
        write_simplex(self.weights, tasks, lam, mass)
        return lam
