"""``aligned_mtl``: Aligned-MTL (Senushkin, Patakin, Kuznetsov & Konushin, CVPR 2023),
torchjd's ``AlignedMTLWeighting`` with its default (uniform) preference vector."""

from __future__ import annotations

from typing import Any

from mtpsl.weighting.base import WEIGHTINGS
from mtpsl.weighting.jacobian import TorchJDWeighting, torchjd_aggregation


@WEIGHTINGS.register("aligned_mtl")
class AlignedMTL(TorchJDWeighting):
    """Aligned-MTL (Senushkin et al., CVPR 2023): the task gradients replaced by the closest
    orthogonal set of equal norms (the smallest singular value), a condition number of 1,
    then averaged (torchjd's AlignedMTLWeighting)."""

    def build(self) -> Any:
        return torchjd_aggregation().AlignedMTLWeighting()
