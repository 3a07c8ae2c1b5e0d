"""``imtl_g``: the gradient part of impartial multi-task learning (Liu, Li, Kuang, Xue, Chen,
Yang, Liao & Zhang, ICLR 2021), torchjd's ``IMTLGWeighting``."""

from __future__ import annotations

from typing import Any

from mtpsl.weighting.base import WEIGHTINGS
from mtpsl.weighting.jacobian import TorchJDWeighting, torchjd_aggregation


@WEIGHTINGS.register("imtl_g")
class IMTLG(TorchJDWeighting):
    """IMTL-G (Liu et al., ICLR 2021): the update has the same projection on every task's
    unit gradient; weights sum to 1 (torchjd's IMTLGWeighting)."""

    def build(self) -> Any:
        return torchjd_aggregation().IMTLGWeighting()
