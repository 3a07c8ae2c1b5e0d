"""``dualproj``: the mean gradient projected onto the task gradients' dual cone (Quinton &
Rey, 2024), torchjd's ``DualProjWeighting`` (needs quadprog: ``pip install "mtpsl[solvers]"``)."""

from __future__ import annotations

from typing import Any

from mtpsl.weighting.base import WEIGHTINGS
from mtpsl.weighting.jacobian import (
    DualConeOptions,
    TorchJDWeighting,
    dual_cone_projector,
    torchjd_aggregation,
)


@WEIGHTINGS.register("dualproj")
class DualProj(TorchJDWeighting):
    """DualProj (Quinton & Rey, 2024): the mean of the task gradients projected onto their
    dual cone, the closest update that conflicts with no task (torchjd's DualProjWeighting)."""

    Options = DualConeOptions
    options: DualConeOptions

    def build(self) -> Any:
        return torchjd_aggregation().DualProjWeighting(projector=dual_cone_projector(self.options))
