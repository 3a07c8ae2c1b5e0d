"""Simplex-valued per-task state under partial labels (MoDo, SDMGrad, ExcessMTL keep one).

Such a strategy holds weights ``lambda`` on the simplex over all T tasks. A batch with only
some tasks present reads their entries renormalised to the simplex (what the strategy would
hold if those were the only tasks), updates them, and writes them back scaled to the share of
the mass they had, so an absent task keeps its weight and a task that is never present makes
no difference at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def read_simplex(weights: Tensor, tasks: Sequence[int]) -> tuple[np.ndarray, float]:
    """The present tasks' entries renormalised to the simplex, and the mass they hold."""
    held = weights.detach().cpu().double()[torch.tensor(list(tasks))].numpy()
    mass = float(held.sum())
    if mass <= 0:  # the others hold all the mass: these start again from uniform
        return np.full(len(held), 1.0 / len(held)), 0.0
    return held / mass, mass


def write_simplex(weights: Tensor, tasks: Sequence[int], values: np.ndarray,
                  mass: float) -> None:
    """Store the updated entries (on the simplex of the present tasks) at their mass."""
    index = torch.tensor(list(tasks), device=weights.device)
    weights[index] = torch.as_tensor(values * mass, dtype=weights.dtype, device=weights.device)
