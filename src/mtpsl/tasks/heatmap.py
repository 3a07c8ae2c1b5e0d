"""2-D keypoint heatmaps: one channel per keypoint, the label a bump (e.g. a Gaussian) at the
keypoint's pixel, and the keypoint's position read back as the heatmap's argmax.

Batch format: float ``[B, K, H, W]`` with values in [0, 1]; a pixel whose value is negative in
any channel (the blank value is -1) is unlabelled. A channel whose label peaks below
:data:`VISIBLE` has no visible keypoint and is left out of the metric. The head predicts
sigmoid probabilities, trained by the mean squared error over labelled pixels (summed over the
K channels), as in CenterNet/SimpleBaseline-style heatmap regression.

Metric ``keypoints``: for every visible keypoint, the distance in pixels between the argmax of
the prediction and of the label; ``pck`` (percentage of correct keypoints) counts those within
``pck_radius`` times the image diagonal, ``dist`` is their mean distance. ``mtpsl predict``
writes the heatmaps (``.npy``), their channel maximum as a grey PNG and the peaks as
``<task>_peaks.npy`` (K rows of y, x, score). Train it on a layout dataset with a folder of
``[H, W, K]`` label arrays::

    dataset.options.extra_tasks={keypoints: {type: heatmap, num_keypoints: 4}}

A horizontal flip mirrors the maps but keeps each channel's identity (a left/right pair of
keypoints is not swapped).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from mtpsl.core.render import Cell, OutputFiles, binary_scale, probability_to_u8
from mtpsl.metrics.base import METRICS, Metric
from mtpsl.tasks.base import TASKS, Interpolation, Task

VISIBLE = 0.5
"""A label channel whose peak is below this holds no visible keypoint."""


@TASKS.register("heatmap")
@dataclass(frozen=True)
class HeatmapTask(Task):
    """2-D keypoint heatmaps (K channels, sigmoid, masked MSE); metric PCK and pixel distance."""

    num_keypoints: int = 1
    pck_radius: float = 0.05
    """A keypoint is correct within this fraction of the image diagonal (PCK@0.05)."""

    channels: ClassVar[int] = 0  # out_channels follows num_keypoints
    interpolation: ClassVar[Interpolation] = "bilinear"
    metric: ClassVar[str] = "keypoints"
    primary_metric: ClassVar[str] = "pck"
    blank_value: ClassVar[float] = -1.0

    @property
    def out_channels(self) -> int:
        return self.num_keypoints

    @property
    def label_dims(self) -> int:  # type: ignore[override]
        return self.num_keypoints

    def metric_kwargs(self) -> dict:
        return {"pck_radius": self.pck_radius}

    def activate(self, raw: Tensor) -> Tensor:
        return torch.sigmoid(raw)

    def valid(self, target: Tensor) -> Tensor:
        return (target >= 0).all(dim=1)

    def pixel_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return ((pred - target) ** 2).sum(dim=1)

    def blank_like(self, target: Tensor) -> Tensor:
        return torch.full_like(target, self.blank_value)

    def encode_target(self, target: Tensor) -> Tensor:
        return torch.where(self.valid(target).unsqueeze(1), target, 0.0)

    def distance(self, pred: Tensor, ref: Tensor) -> Tensor:
        """Mean squared difference per image (two heatmap predictions, no invalid pixels)."""
        return ((pred - ref) ** 2).flatten(1).mean(dim=1)

    def label_problem(self, label: np.ndarray) -> str | None:
        if label.ndim == 3 and label.shape[-1] != self.num_keypoints:
            return f"heatmap labels need {self.num_keypoints} channels, found {label.shape[-1]}"
        bad = (label > 1) | ((label < 0) & (label != self.blank_value))
        if bad.any():
            return (f"heatmap values must lie in [0, 1] ({self.blank_value:g} = unlabelled), "
                    f"found {float(label[bad].flat[0])}")
        return None

    def finalise(self, pred: Tensor) -> np.ndarray:
        """Heatmaps (H, W, K) float32 in [0, 1]."""
        return pred.clamp(0.0, 1.0).permute(1, 2, 0).cpu().numpy().astype(np.float32)

    def save_prediction(self, array: np.ndarray, files: OutputFiles) -> None:
        files.png(probability_to_u8(array.max(axis=-1)), self.name)
        files.npy(array, self.name)
        files.npy(peaks(array), f"{self.name}_peaks")

    def panels(self, target: Tensor | None, preds: Sequence[Tensor]) -> list[Cell]:
        """The channel maximum in grey on [0, 1]; unlabelled label pixels masked."""
        cells: list[Cell] = []
        if target is not None:
            label = target.numpy()
            valid = (label >= 0).all(axis=0)
            cells.append((np.ma.masked_array(np.where(valid, label.max(0), 0.0), ~valid),
                          binary_scale()))
        return cells + [(p.numpy().max(0), binary_scale()) for p in preds]


def peaks(heatmaps: np.ndarray) -> np.ndarray:
    """(H, W, K) heatmaps -> (K, 3) float32 rows of (y, x, peak value), first maximum."""
    h, w, k = heatmaps.shape
    flat = heatmaps.reshape(h * w, k)
    index = flat.argmax(axis=0)
    return np.stack([index // w, index % w, flat[index, np.arange(k)]], axis=1).astype(
        np.float32)


@METRICS.register("keypoints")
class KeypointMetric(Metric):
    """PCK (%) and mean pixel distance of heatmap argmaxes over visible keypoints."""

    higher_is_better: ClassVar[dict[str, bool]] = {"pck": True, "dist": False}

    def __init__(self, pck_radius: float = 0.05, device: torch.device | str | None = None):
        self.pck_radius = pck_radius
        super().__init__(device)

    def _new_state(self, device: torch.device, float_dtype: torch.dtype) -> dict[str, Tensor]:
        return {"count": torch.zeros((), dtype=torch.int64, device=device),
                "correct": torch.zeros((), dtype=torch.int64, device=device),
                "dist": torch.zeros((), dtype=float_dtype, device=device)}

    def update(self, pred: Tensor, target: Tensor) -> None:
        if pred.shape != target.shape or pred.ndim != 4:
            raise ValueError(f"keypoints: pred {tuple(pred.shape)} and target "
                             f"{tuple(target.shape)} must both be [B, K, H, W]")
        self._follow(pred, target)
        _b, _k, h, w = target.shape
        labelled = (target >= 0).all(dim=1, keepdim=True)
        label = torch.where(labelled, target, 0.0).flatten(2)
        guess = pred.detach().float().flatten(2)
        peak, where_label = label.max(dim=2)
        where_pred = guess.argmax(dim=2)
        dy = (where_pred // w - where_label // w).to(self._state["dist"].dtype)
        dx = (where_pred % w - where_label % w).to(self._state["dist"].dtype)
        dist = torch.sqrt(dy * dy + dx * dx)
        visible = peak >= VISIBLE
        s = self._state
        s["count"] += visible.sum()
        s["correct"] += (visible & (dist <= self.pck_radius * math.hypot(h, w))).sum()
        s["dist"] += torch.where(visible, dist, 0.0).sum()

    def compute(self) -> dict[str, float]:
        s = self._host()
        n = int(s["count"])
        if n == 0:
            return dict.fromkeys(self.higher_is_better, math.nan)
        return {"pck": 100.0 * int(s["correct"]) / n, "dist": float(s["dist"]) / n}
