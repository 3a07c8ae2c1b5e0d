"""Salient-object maps: ``saliency`` (maxF and mIoU as the multi-task PASCAL-Context benchmark
defines them, the default) and ``saliency_pooled`` (the same names over set-pooled counts)."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from mtpsl.metrics.base import (
    METRICS,
    Metric,
    _binary_bins,
    _binary_valid,
    _check_dense_pair,
    _count_into,
    _f_measure,
    _suffix_sums,
)

BENCHMARK_THRESHOLDS: tuple[float, ...] = tuple(np.linspace(0.2, 0.9, 15).tolist())
"""``eval_sal_predictions`` of Vandenhende et al.'s benchmark: ``np.linspace(0.2, 0.9, 15)``."""


@METRICS.register("saliency")
class SaliencyMetric(Metric):
    """Saliency maxF and mIoU as ``evaluation/eval_sal.py`` of the multi-task PASCAL-Context
    benchmark (Vandenhende et al., "Multi-Task-Learning-PyTorch") computes them.

    Per image and threshold ``t`` (15 from 0.2 to 0.9), the prediction is salient where
    ``p > t``; ``precision = tp / (tp + fp + 1e-12)``, ``recall = tp / (tp + fn + 1e-12)`` and
    the foreground Jaccard ``tp / (tp + fp + fn)`` (1 when neither map has a salient pixel).
    Each is averaged over the images; ``maxf`` is the maximum over thresholds of
    ``(1 + b2) mP mR / (b2 mP + mR + 1e-12)`` with ``b2 = beta_sq = 1`` (the benchmark's
    ``2 mP mR / (mP + mR + 1e-12)``), ``miou`` the maximum of the mean Jaccard.

    ``levels=255`` reads the prediction as the benchmark does, from the 8-bit PNG it saved
    (``uint8(255 p)``, i.e. ``floor``), compared in float32 as numpy 1.x did; ``None`` keeps
    the probabilities. Target values other than 0/1 (padding) are void: left out, as cropping
    the padding away would. An image with no labelled pixel is skipped.
    """

    higher_is_better: ClassVar[dict[str, bool]] = {"maxf": True, "miou": True}

    def __init__(
        self, thresholds: tuple[float, ...] | list[float] = BENCHMARK_THRESHOLDS,
        beta_sq: float = 1.0, levels: int | None = 255, device: torch.device | str | None = None,
    ) -> None:
        if len(thresholds) == 0:
            raise ValueError("thresholds must not be empty")
        if levels is not None and levels < 1:
            raise ValueError(f"levels must be >= 1 or None, got {levels!r}")
        self.thresholds = tuple(float(t) for t in thresholds)
        self.beta_sq = float(beta_sq)
        self.levels = levels
        super().__init__(device)

    def _new_state(self, device: torch.device, float_dtype: torch.dtype) -> dict[str, Tensor]:
        return {"sums": torch.zeros(3, len(self.thresholds), dtype=float_dtype, device=device),
                "images": torch.zeros(1, dtype=torch.int64, device=device)}

    def update(self, pred: Tensor, target: Tensor) -> None:
        _check_dense_pair("saliency", pred, target, 1)
        self._follow(pred, target)
        t = target[:, 0]
        valid = _binary_valid(t)
        salient = (t == 1).flatten(1)
        prob = pred.detach()[:, 0].to(torch.float32)
        if self.levels is not None:
            prob = torch.floor(prob * self.levels) / self.levels
        cuts = torch.tensor(self.thresholds, dtype=torch.float32, device=pred.device)
        above = ((prob.unsqueeze(1) > cuts[:, None, None]) & valid.unsqueeze(1)).flatten(2)
        s = salient.unsqueeze(1)
        tp = (above & s).sum(-1).to(self._state["sums"].dtype)  # [B, T]
        fp = (above & ~s).sum(-1).to(tp.dtype)
        fn = (~above & s).sum(-1).to(tp.dtype)
        union = tp + fp + fn
        jaccard = torch.where(union > 0, tp / union.clamp_min(1), 1.0)
        keep = valid.flatten(1).any(-1)
        per_image = torch.stack([tp / (tp + fp + 1e-12), tp / (tp + fn + 1e-12), jaccard], 1)
        self._state["sums"] += (per_image * keep[:, None, None]).sum(0)
        self._state["images"] += keep.sum()

    def compute(self) -> dict[str, float]:
        state = self._host()
        n = int(state["images"])
        if n == 0:
            return dict.fromkeys(self.higher_is_better, math.nan)
        precision, recall, jaccard = (state["sums"].to(torch.float64) / n).unbind(0)
        f = (1 + self.beta_sq) * precision * recall / (self.beta_sq * precision + recall + 1e-12)
        return {"maxf": float(f.max()), "miou": float(jaccard.max())}


@METRICS.register("saliency_pooled")
class PooledSaliencyMetric(Metric):
    """Saliency over set-pooled counts (the form some later multi-task codebases use): max
    F-measure (``maxf_pooled``) and threshold-max two-class mIoU (``miou_pooled``). Not the
    PASCAL-Context benchmark's definition (that is :class:`SaliencyMetric`); on the same
    predictions the two can differ by tens of points.

    ``pred`` is a probability map ``[B,1,H,W]``; ``target`` is 0/1, other values ignored.
    Thresholds are ``k / num_bins`` for ``k = 1..num_bins-1`` (0.01..0.99 by default). For
    every threshold, precision and recall come from the counts pooled over the whole set (not
    per image); ``maxf`` is the maximum over thresholds of
    ``F = (1 + b2) P R / (b2 P + R)`` with ``b2 = beta_sq = 0.3``, and ``miou`` the maximum over
    thresholds of the mean of the foreground and background IoU. One pass suffices: a
    histogram of the predicted probabilities per ground-truth class holds every threshold.
    """

    higher_is_better: ClassVar[dict[str, bool]] = {"maxf_pooled": True, "miou_pooled": True}
    contract_task = ("saliency", {})  # no task type names it: offered to the API

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
            "maxf_pooled": float(_f_measure(precision, recall, self.beta_sq).max()),
            "miou_pooled": float(((iou_fg + iou_bg) / 2).max()),
        }
