"""``config``: conflict-free inverse gradients (Liu, Chu & Thuerey, "ConFIG: Towards
Conflict-free Training of Physics Informed Neural Networks", ICLR 2025), torchjd's ``ConFIG``.

The update's direction is the unit vector whose cosine with every task's unit gradient is the
same (the pseudo-inverse of the unit gradients applied to ones, normalised); its length is the
sum of the task gradients' projections on it. It is a Jacobian aggregator (it needs the
gradients, not only their Gram matrix), so the torchjd object is applied to the present tasks'
gradients of the shared parameters; the heads get the plain sum. torchjd's preference vector
is not exposed: with partial labels the tasks present change from batch to batch, and equal
preference is the method's default.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mtpsl.weighting.base import WEIGHTINGS
from mtpsl.weighting.gradient import JacobianWeighting
from mtpsl.weighting.jacobian import torchjd_aggregation


@WEIGHTINGS.register("config")
class ConFIG(JacobianWeighting):
    """ConFIG (Liu et al., ICLR 2025): one update equally aligned with every task gradient."""

    def aggregate(self, grads: Tensor, losses: Tensor, tasks: Sequence[int]) -> Tensor:
        return torchjd_aggregation().ConFIG()(grads)
