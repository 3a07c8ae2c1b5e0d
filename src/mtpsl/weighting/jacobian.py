"""Gramian weightings of torchjd (Quinton & Rey, "Jacobian Descent for Multi-Objective
Optimization", 2024; ``pip install torchjd``) as mtpsl gradient rules.

Decision: where torchjd implements a strategy as a *Gramian weighting* (the task gradients'
K x K Gram matrix in, one weight per task out), mtpsl uses it instead of writing it again, and
wraps it in :class:`~mtpsl.weighting.gradient.GradientWeighting`, which already computes the
present tasks' gradients of the shared parameters and their Gram matrix and applies
``sum_k w_k g_k``. That keeps mtpsl's part the same for every such strategy: absent tasks
(partial labels) are left out of the Gram matrix, so the result equals the strategy on the
present tasks alone; the task heads get the plain sum; the weights are computed in float64 on
the host. Wrapped: IMTL-G, Aligned-MTL, UPGrad, DualProj, FairGrad (here) and ConFIG (a
Jacobian aggregator, ``conflict_free.py``). Written in mtpsl instead, each tested against
torchjd's object: the stateful ones (GradVac, MoDo, SDMGrad, CR-MOGM, ExcessMTL keep K-sized
state that torchjd resets whenever K changes, i.e. whenever the tasks present in a batch do)
and GradDrop (torchjd draws from the global generator, which would shift the run's other
random streams and break exact resumption). Loss-level methods are mtpsl's own
(``uncertainty``, ``dwa``, ``rlw``, ``gls``, ``stch``, ``famo``...). Kept as mtpsl's own, with
torchjd as their test oracle: MGDA (exact for two tasks, Frank-Wolfe to 1e-10 beyond, where
torchjd's stops at its tolerance; and the normalisations of Sener & Koltun's code), PCGrad
(the same arithmetic, but orders from a generator saved with the run) and CAGrad (torchjd's
needs cvxpy and clarabel; ours solves the dual on the Gram matrix). Left out: Krum and
TrimmedMean (Byzantine-robust aggregation, not multi-task methods), Mean/Sum (``uniform``),
Random (``rlw``). torchjd's autogram engine is used as it is for the Gram matrix of the
shared parameters without the gradients (``method.weighting_gradients=gramian``,
``gramian.py``): every strategy here and every other ``coefficients`` rule takes it.

Solvers: UPGrad and DualProj project onto a dual cone with quadprog, an optional dependency
(``pip install "mtpsl[solvers]"``); without it they fail at construction with that command.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from mtpsl.core.errors import ConfigError
from mtpsl.weighting.gradient import GradientWeighting


class TorchJDWeighting(GradientWeighting):
    """A torchjd Gramian weighting (what :meth:`build` returns) as a gradient rule."""

    def __init__(self, task_names: Sequence[str], options: BaseModel | None = None) -> None:
        super().__init__(task_names, options)
        try:
            self.torchjd = self.build()
        except ImportError as err:
            raise ConfigError(f"method.weighting: {err}; install mtpsl's solvers with "
                              f'pip install "mtpsl[solvers]"') from None

    def build(self) -> Any:
        """The torchjd weighting (a module called on a Gramian tensor), from ``self.options``."""
        raise NotImplementedError

    def coefficients(self, gram: np.ndarray, losses: np.ndarray,
                     tasks: Sequence[int] | None = None) -> np.ndarray:
        weights = self.torchjd(torch.from_numpy(gram))
        return weights.detach().double().numpy()


def torchjd_aggregation() -> Any:
    """``torchjd.aggregation``, or a ConfigError saying how to install it."""
    try:
        import torchjd.aggregation
    except ImportError:
        raise ConfigError("method.weighting: torchjd is not installed (pip install torchjd)"
                          ) from None
    return torchjd.aggregation


class DualConeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    norm_eps: float = Field(default=1e-4, ge=0.0)
    """Added to the Gramian's norm before the projection (torchjd's default): stability."""
    reg_eps: float = Field(default=1e-4, ge=0.0)
    """Added to the Gramian's diagonal (torchjd's default): the projection is exact at 0, a
    slightly shrunk one above (1e-4 moves it by about 1e-4 relative)."""


def dual_cone_projector(options: DualConeOptions) -> Any:
    """torchjd's quadprog dual-cone projector with these tolerances (ImportError without
    quadprog)."""
    from torchjd._linalg._dual_cone import QuadprogProjector

    return QuadprogProjector(norm_eps=options.norm_eps, reg_eps=options.reg_eps)
