"""``normal``: angular errors of surface normals (mean, median, RMSE, within thresholds)."""

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
    _count_into,
    _work_float,
)

NORMAL_THRESHOLDS_DEG: tuple[float, ...] = (11.25, 22.5, 30.0)


def _normal_angles(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-pixel angle in degrees ``[B, H, W]`` (0 where invalid) and the valid mask.

    The three channels are combined by hand: ``norm``/``any``/``sum`` over the strided
    channel axis of an NCHW tensor are an order of magnitude slower on CPU than a few
    elementwise ops on the contiguous channel planes. ``(p . t) / max(|p|, 1e-12)`` is the
    dot product of the normalised prediction with the target, up to rounding.
    """
    px, py, pz = pred.unbind(1)
    tx, ty, tz = target.unbind(1)
    valid = tx.bool() | ty.bool() | tz.bool()  # any non-zero channel (bool() is != 0)
    norm = torch.sqrt(px * px + py * py + pz * pz).clamp_min_(1e-12)
    dot = ((px * tx + py * ty + pz * tz) / norm).clamp_(-1.0, 1.0)
    angle = torch.rad2deg(torch.acos(dot))
    return torch.where(valid, angle, 0.0), valid


@METRICS.register("normal")
class NormalMetric(Metric):
    """Angular error (degrees) of surface normals over valid pixels (any non-zero gt channel).

    The prediction is L2-normalised here (a network head need not output unit vectors); the
    target is used as given (assumed unit). The median comes from a histogram with
    ``median_bin_deg`` bins over [0, 180] so memory does not grow with the set: it is the
    centre of the bin holding the median angle, so its resolution is ``median_bin_deg``
    (1e-3 degrees by default; error <= bin/2 from the median of the angles as computed).
    Threshold percentages are exact counts, mean and RMSE exact sums.

    Angles are computed in float32 per pixel (float64 is ~10x slower on CPU) and summed in
    float64. Measured against float64 on the same float32 inputs, a pixel's angle is off by
    at most ~3e-5 degrees for angles in [20, 120], ~2e-4 in [5, 20], ~1e-3 in [1, 5], and up
    to ~0.04 degrees within 1 degree of 0 or 180, where the float32 cosine is too coarse
    (``acos`` is ill-conditioned there). Set means and medians move far less than that.
    """

    higher_is_better: ClassVar[dict[str, bool]] = {
        "mean": False,
        "median": False,
        "rmse": False,
        "within_11_25": True,
        "within_22_5": True,
        "within_30": True,
    }

    def __init__(
        self, median_bin_deg: float = 1e-3, device: torch.device | str | None = None
    ) -> None:
        if not (0 < median_bin_deg <= 180):
            raise ValueError(f"median_bin_deg must be in (0, 180], got {median_bin_deg!r}")
        self.median_bin_deg = float(median_bin_deg)
        self.num_bins = max(1, math.ceil(180.0 / self.median_bin_deg))
        super().__init__(device)

    def _new_state(self, device: torch.device, float_dtype: torch.dtype) -> dict[str, Tensor]:
        return {
            "count": torch.zeros((), dtype=torch.int64, device=device),
            "sum": torch.zeros((), dtype=float_dtype, device=device),
            "sq": torch.zeros((), dtype=float_dtype, device=device),
            "within": torch.zeros(len(NORMAL_THRESHOLDS_DEG), dtype=torch.int64, device=device),
            "hist": torch.zeros(self.num_bins, dtype=torch.int64, device=device),
        }

    def update(self, pred: Tensor, target: Tensor) -> None:
        _check_dense_pair("normal", pred, target, 3)
        self._follow(pred, target)
        s = self._state
        acc = s["sum"].dtype
        angle, valid = _normal_angles(*_work_float(pred, target))
        n_valid = valid.sum()
        s["count"] += n_valid
        s["sum"] += angle.sum(dtype=acc)
        s["sq"] += (angle * angle).sum(dtype=acc)
        # invalid pixels hold angle 0, below every threshold: count all, then remove them
        n_invalid = valid.numel() - n_valid
        below = [_count_below(angle, th, acc) for th in NORMAL_THRESHOLDS_DEG]
        s["within"] += torch.stack(below) - n_invalid
        bins = torch.floor(angle / self.median_bin_deg).long().clamp_(0, self.num_bins - 1)
        _count_into(s["hist"], bins, valid)

    def compute(self) -> dict[str, float]:
        s, n, within = self._host_counts()
        if n == 0:
            return dict.fromkeys(self.higher_is_better, math.nan)
        return {
            "mean": float(s["sum"]) / n,
            "median": self._hist_median(s["hist"]),
            "rmse": math.sqrt(float(s["sq"]) / n),
            "within_11_25": float(within[0]),
            "within_22_5": float(within[1]),
            "within_30": float(within[2]),
        }

    def _hist_median(self, hist: Tensor) -> float:
        """Median from bin counts: mean of the centres of the two middle ranks' bins
        (the same bin for an odd count), so the error stays <= bin/2."""
        n = int(hist.sum())
        if n == 0:
            return math.nan
        cum = hist.cumsum(0)
        ranks = torch.tensor([(n + 1) // 2, n // 2 + 1], dtype=cum.dtype)  # 1-based
        idx = torch.searchsorted(cum, ranks, side="left").to(torch.float64)
        return float((idx.mean() + 0.5) * self.median_bin_deg)
