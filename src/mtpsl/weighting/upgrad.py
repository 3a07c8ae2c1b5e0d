"""``upgrad``: unconflicting projection of gradients (Quinton & Rey, 2024), torchjd's
``UPGradWeighting`` (needs quadprog: ``pip install "mtpsl[solvers]"``)."""

from __future__ import annotations

from typing import Any

from mtpsl.weighting.base import WEIGHTINGS
from mtpsl.weighting.jacobian import (
    DualConeOptions,
    TorchJDWeighting,
    dual_cone_projector,
    torchjd_aggregation,
)


@WEIGHTINGS.register("upgrad")
class UPGrad(TorchJDWeighting):
    """UPGrad (Quinton & Rey, 2024): every task gradient projected onto the dual cone of all
    of them (so it conflicts with none), the projections averaged (torchjd's UPGradWeighting)."""

    Options = DualConeOptions
    options: DualConeOptions

    def build(self) -> Any:
        return torchjd_aggregation().UPGradWeighting(projector=dual_cone_projector(self.options))
