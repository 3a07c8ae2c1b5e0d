"""One-channel binary maps: salient objects and semantic boundaries."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from mtpsl.core.render import (
    Cell,
    OutputFiles,
    binary_label_cell,
    binary_scale,
    probability_cell,
    probability_to_u8,
)
from mtpsl.tasks.base import TASKS, Interpolation, Task
from mtpsl.tasks.scoring import build_metrics


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
    """Semantic boundaries; BCE weighted 0.95 on edge pixels (they are rare); metric odsF.

    ``measure="bsds"`` (default) scores with the published protocol (``edge``: thinning and
    one-to-one matching, odsF and oisF; host-side, seconds per 512 x 512 image);
    ``"dilation"`` with the fast on-device approximation ``edge_dilation`` (key
    ``odsf_dilation``, not comparable with published numbers), for monitoring in training.
    ``protocol`` picks the BSDS measure's odsF: ``"bsds"`` (BSDS's interpolated best F) or
    ``"seism"`` (the PASCAL-Context benchmark's ``eval_edge.py``: the best F over its 99
    thresholds); see :class:`~mtpsl.metrics.edge.EdgeMetric`.
    """

    pos_weight: float | None = 0.95
    max_dist: float = 0.0075
    """Matching tolerance of the odsF metric, as a fraction of the image diagonal."""
    measure: Literal["bsds", "dilation"] = "bsds"
    workers: int = 0
    """Processes scoring images with the BSDS measure during evaluation (0: in process)."""
    protocol: Literal["bsds", "seism"] = "bsds"
    """odsF of the BSDS measure: BSDS's interpolated one or SEISM's (the benchmark's)."""

    metric: ClassVar[str] = "edge"
    primary_metric: ClassVar[str] = "odsf"
    alternative_metrics: ClassVar[dict[str, str]] = {"edge_dilation": "odsf_dilation"}

    def __post_init__(self) -> None:
        if self.measure not in ("bsds", "dilation"):
            raise ValueError(f"edge task {self.name!r}: measure must be 'bsds' or 'dilation', "
                             f"got {self.measure!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"edge task {self.name!r}: workers must be an integer >= 0, "
                             f"got {self.workers!r}")
        if self.protocol not in ("bsds", "seism"):
            raise ValueError(f"edge task {self.name!r}: protocol must be 'bsds' or 'seism', "
                             f"got {self.protocol!r}")

    def metric_name(self) -> str:
        return self.metric if self.measure == "bsds" else "edge_dilation"

    def with_scoring(self, measure: str | None = None, workers: int | None = None) -> EdgeTask:
        return dataclasses.replace(
            self, measure=self.measure if measure is None else measure,  # type: ignore[arg-type]
            workers=self.workers if workers is None else workers)

    def metric_kwargs(self) -> dict:
        if self.measure == "dilation":
            return {"max_dist": self.max_dist}
        if self.protocol == "bsds":
            return {"max_dist": self.max_dist, "workers": self.workers}
        return {"max_dist": self.max_dist, "workers": self.workers, "protocol": self.protocol}

    def panels(self, target: Tensor | None, preds: Sequence[Tensor]) -> list[Cell]:
        """Predictions as the 0/1 maps their per-image score is taken at (:func:`edge_map`);
        without a label, as probabilities."""
        if target is None:
            return super().panels(None, preds)
        return [binary_label_cell(target.numpy())] + [
            (edge_map(self, p, target), binary_scale()) for p in preds]


def edge_map(task: EdgeTask, pred: Tensor, target: Tensor) -> np.ndarray:
    """A ``[1, H, W]`` edge probability map as the 0/1 map its per-image score is taken at
    (the metric's ``best_map``: thinned for the BSDS measure)."""
    metric: Any = build_metrics({task.name: task})[task.name]
    return metric.best_map(pred[None], target[None])
