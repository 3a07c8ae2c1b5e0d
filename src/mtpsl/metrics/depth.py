"""``depth``: absolute/relative errors, RMSE and delta thresholds over valid pixels."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from mtpsl.metrics.base import (
    METRICS,
    Metric,
    _check_dense_pair,
    _count_below,
    _work_float,
)


@METRICS.register("depth")
class DepthMetric(Metric):
    """Depth errors over valid pixels (target != 0 and finite), pooled over the whole set.

    ``delta_k`` is the percentage of valid pixels with ``max(p/g, g/p) < 1.25**k``; a
    non-positive prediction (or target) has no meaningful ratio and counts as outside.

    Per-pixel arithmetic is float32 (what a float32 prediction carries anyway), each batch's
    sums are accumulated in float64. So a ratio within one float32 rounding (~6e-8 relative)
    of ``1.25**k`` may fall on the other side of the threshold than in float64.
    """

    higher_is_better: ClassVar[dict[str, bool]] = {
        "abs_err": False,
        "rel_err": False,
        "rmse": False,
        "delta1": True,
        "delta2": True,
        "delta3": True,
    }

    def _new_state(self, device: torch.device, float_dtype: torch.dtype) -> dict[str, Tensor]:
        return {
            "count": torch.zeros((), dtype=torch.int64, device=device),
            "abs": torch.zeros((), dtype=float_dtype, device=device),
            "rel": torch.zeros((), dtype=float_dtype, device=device),
            "sq": torch.zeros((), dtype=float_dtype, device=device),
            "within": torch.zeros(3, dtype=torch.int64, device=device),
        }

    def update(self, pred: Tensor, target: Tensor) -> None:
        _check_dense_pair("depth", pred, target, 1)
        self._follow(pred, target)
        s = self._state
        acc = s["abs"].dtype
        p, g = _work_float(pred, target)
        g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)  # non-finite = unlabelled
        valid = g.bool()
        # Masking with torch.where, not boolean indexing: indexing would sync to size the output.
        diff = torch.where(valid, p - g, 0.0)
        adiff = diff.abs()
        g_safe = g + torch.eq(g, 0.0, out=torch.empty_like(g))  # 1 where unlabelled
        s["count"] += valid.sum()
        s["abs"] += adiff.sum(dtype=acc)
        s["rel"] += (adiff / g_safe).sum(dtype=acc)
        s["sq"] += (diff * diff).sum(dtype=acc)
        # Unless p > 0 and g > 0 the ratio is inf or NaN (x / 0 with x >= 0), never "within";
        # + 0.0 turns -0.0 into +0.0 so that 1 / 0 is +inf.
        p_pos = p.clamp_min(0.0).add_(0.0)
        g_pos = g.clamp_min(0.0).add_(0.0)
        ratio = torch.maximum(p_pos / g_pos, g_pos / p_pos)
        s["within"] += torch.stack([_count_below(ratio, 1.25**k, acc) for k in (1, 2, 3)])

    def compute(self) -> dict[str, float]:
        s, n, within = self._host_counts()
        if n == 0:
            return dict.fromkeys(self.higher_is_better, math.nan)
        return {
            "abs_err": float(s["abs"]) / n,
            "rel_err": float(s["rel"]) / n,
            "rmse": math.sqrt(float(s["sq"]) / n),
            "delta1": float(within[0]),
            "delta2": float(within[1]),
            "delta3": float(within[2]),
        }
