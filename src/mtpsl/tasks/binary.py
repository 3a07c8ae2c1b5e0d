"""One-channel binary maps: salient objects and semantic boundaries."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..render import (
    Cell,
    OutputFiles,
    binary_label_cell,
    binary_scale,
    probability_cell,
    probability_to_u8,
)
from .base import TASKS, Interpolation, Task


@dataclass(frozen=True)
class BinaryTask(Task):
    """One-channel binary map (probability after a sigmoid); label float ``[B,1,H,W]``.

    Label values are 0 or 1; any other value (the blank/pad value is -1) marks an unlabelled
    pixel. Loss: weighted binary cross-entropy
    ``-(w * y * log p + (1 - w) * (1 - y) * log(1 - p))`` with ``w = pos_weight``, or the plain
    BCE (both terms weight 1) when ``pos_weight`` is None. Mapping-network input: the
    probability map and the 0/1 label (unlabelled pixels 0).
    """

    pos_weight: float | None = None

    channels: ClassVar[int] = 1
    interpolation: ClassVar[Interpolation] = "nearest"
    label_dims: ClassVar[int] = 1
    eps: ClassVar[float] = 1e-7
    """Probabilities are clamped to [eps, 1 - eps] so log stays finite."""
    blank_value: ClassVar[float] = -1.0

    def activate(self, raw: Tensor) -> Tensor:
        return torch.sigmoid(raw)

    def valid(self, target: Tensor) -> Tensor:
        return ((target == 0) | (target == 1)).all(dim=1)

    def pixel_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        p = pred.clamp(self.eps, 1.0 - self.eps)
        y = torch.where(self.valid(target).unsqueeze(1), target, 0.0)
        w_pos, w_neg = (1.0, 1.0) if self.pos_weight is None else (
            self.pos_weight, 1.0 - self.pos_weight)
        loss = -(w_pos * y * p.log() + w_neg * (1.0 - y) * (1.0 - p).log())
        return loss.sum(dim=1)

    def blank_like(self, target: Tensor) -> Tensor:
        return torch.full_like(target, self.blank_value)

    def pseudo_label(self, prob_map: Tensor, threshold: float) -> Tensor:
        """1 or 0 where ``max(p, 1 - p)`` reaches ``threshold``, else the blank value."""
        hard = (prob_map >= 0.5).to(prob_map.dtype)
        confident = torch.maximum(prob_map, 1.0 - prob_map) >= threshold
        return torch.where(confident, hard, self.blank_value)

    def encode_target(self, target: Tensor) -> Tensor:
        return torch.where(self.valid(target).unsqueeze(1), target, 0.0)

    def distance(self, pred: Tensor, ref: Tensor) -> Tensor:
        """Mean ``|pred - ref|`` per image over all pixels (two probability maps)."""
        return (pred - ref).abs().flatten(1).mean(dim=1)

    def finalise(self, pred: Tensor) -> np.ndarray:
        """Probabilities (H,W) float32 in [0, 1] (resizing and tile averaging keep them there
        up to rounding)."""
        return pred[0].clamp(0.0, 1.0).cpu().numpy().astype(np.float32)

    def save_prediction(self, array: np.ndarray, files: OutputFiles) -> None:
        """``<task>.png`` (8-bit grey, ``round(255 p)``) and ``.npy`` (float32 H,W)."""
        files.png(probability_to_u8(array), self.name)
        files.npy(array, self.name)

    def panels(self, target: Tensor | None, preds: Sequence[Tensor]) -> list[Cell]:
        cells = [] if target is None else [binary_label_cell(target.numpy())]
        return cells + [probability_cell(p.numpy()) for p in preds]


@TASKS.register("saliency")
@dataclass(frozen=True)
class SaliencyTask(BinaryTask):
    """Salient-object map; plain BCE by default; metrics threshold-max mIoU (the paper's
    Table 3 column, so the primary one) and maxF."""

    metric: ClassVar[str] = "saliency"
    primary_metric: ClassVar[str] = "miou"


@TASKS.register("edge")
@dataclass(frozen=True)
class EdgeTask(BinaryTask):
    """Semantic boundaries; BCE weighted 0.95 on edge pixels (they are rare); metric odsF."""

    pos_weight: float | None = 0.95
    max_dist: float = 0.0075
    """Matching tolerance of the odsF metric, as a fraction of the image diagonal."""

    metric: ClassVar[str] = "edge"
    primary_metric: ClassVar[str] = "odsf"

    def metric_kwargs(self) -> dict:
        return {"max_dist": self.max_dist}

    def panels(self, target: Tensor | None, preds: Sequence[Tensor]) -> list[Cell]:
        """Predictions as the 0/1 maps their odsF is taken at (:func:`edge_map`); without a
        label, as probabilities."""
        if target is None:
            return super().panels(None, preds)
        return [binary_label_cell(target.numpy())] + [
            (edge_map(self, p, target), binary_scale()) for p in preds]


def edge_map(task: EdgeTask, pred: Tensor, target: Tensor) -> np.ndarray:
    """A ``[1, H, W]`` edge probability map as the 0/1 map its per-image score is taken at:
    thresholded, with the metric's binning, at the threshold where this image alone reaches
    its best odsF; at 0.5 where no threshold scores above 0 (no labelled pixel, or no edge in
    the label), since any threshold then ties."""
    from ..evaluate import build_metrics

    metric: Any = build_metrics({task.name: task})[task.name]  # an EdgeMetric
    metric.update(pred[None], target[None])
    best = metric.compute()[task.primary_metric]
    threshold = metric.best["threshold"] if best > 0 else 0.5  # NaN > 0 is False
    bins = metric.num_bins
    k = round(threshold * bins)
    prob = pred[0].to(torch.float64).numpy()  # the metric's bins are taken in float64
    return (np.floor(prob * bins) >= k).astype(np.float32)
