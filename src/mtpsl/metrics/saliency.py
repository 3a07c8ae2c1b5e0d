"""``saliency``: max F-measure and threshold-max mIoU of salient-object maps."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from .base import (
    METRICS,
    Metric,
    _binary_bins,
    _count_into,
    _f_measure,
    _suffix_sums,
)


@METRICS.register("saliency")
class SaliencyMetric(Metric):
    """Saliency: max F-measure and threshold-max mIoU over a grid of thresholds.

    ``pred`` is a probability map ``[B,1,H,W]``; ``target`` is 0/1, other values ignored.
    Thresholds are ``k / num_bins`` for ``k = 1..num_bins-1`` (0.01..0.99 by default). For
    every threshold, precision and recall come from the counts pooled over the whole set (not
    per image); ``maxf`` is the maximum over thresholds of
    ``F = (1 + b2) P R / (b2 P + R)`` with ``b2 = beta_sq = 0.3``, and ``miou`` the maximum over
    thresholds of the mean of the foreground and background IoU. One pass suffices: a
    histogram of the predicted probabilities per ground-truth class holds every threshold.
    """

    higher_is_better: ClassVar[dict[str, bool]] = {"maxf": True, "miou": True}

    def __init__(
        self, num_bins: int = 100, beta_sq: float = 0.3, device: torch.device | str | None = None
    ) -> None:
        if num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {num_bins!r}")
        self.num_bins = int(num_bins)
        self.beta_sq = float(beta_sq)
        super().__init__(device)

    def _new_state(self, device: torch.device, float_dtype: torch.dtype) -> dict[str, Tensor]:
        return {"hist": torch.zeros(2, self.num_bins, dtype=torch.int64, device=device)}

    def update(self, pred: Tensor, target: Tensor) -> None:
        bins, valid = _binary_bins(pred, target, self.num_bins, "saliency")
        self._follow(pred, target)
        fg = target[:, 0].bool().long()  # 1 = salient where valid
        _count_into(self._state["hist"].view(-1), fg * self.num_bins + bins, valid)

    def compute(self) -> dict[str, float]:
        hist = self._host()["hist"].to(torch.float64)
        above = _suffix_sums(hist)[:, 1:]  # thresholds k = 1..num_bins-1
        neg, pos = hist.sum(dim=1)
        if pos + neg == 0:
            return dict.fromkeys(self.higher_is_better, math.nan)
        fp, tp = above[0], above[1]
        fn, tn = pos - tp, neg - fp
        precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1), torch.zeros_like(tp))
        recall = tp / pos if pos > 0 else torch.zeros_like(tp)
        iou_fg = torch.where(tp + fp + fn > 0, tp / (tp + fp + fn).clamp_min(1), 1.0)
        iou_bg = torch.where(tn + fp + fn > 0, tn / (tn + fp + fn).clamp_min(1), 1.0)
        return {
            "maxf": float(_f_measure(precision, recall, self.beta_sq).max()),
            "miou": float(((iou_fg + iou_bg) / 2).max()),
        }
