"""Per-pixel depth (or disparity): a scalar with a scale."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from mtpsl.core.render import Cell, OutputFiles, colourise_depth, depth_cells, depth_to_mm16
from mtpsl.tasks.base import TASKS, Interpolation, Task, broadcast_scale


@TASKS.register("depth")
@dataclass(frozen=True)
class DepthTask(Task):
    """Per-pixel depth (metres) or disparity; masked L1 over pixels with a non-zero label."""

    channels: ClassVar[int] = 1
    interpolation: ClassVar[Interpolation] = "nearest"
    metric: ClassVar[str] = "depth"
    primary_metric: ClassVar[str] = "abs_err"
    label_dims: ClassVar[int] = 1
    continuous: ClassVar[bool] = True

    def valid(self, target: Tensor) -> Tensor:
        return (target != 0).any(dim=1) & torch.isfinite(target).all(dim=1)

    def pixel_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return (pred - target).abs().sum(dim=1)

    def on_rescale(self, target: Tensor, scale: float | Tensor) -> Tensor:
        # Zooming in by s brings the scene s times closer (the reference divides by s).
        return target / broadcast_scale(scale, target)

    def _normalise(self, x: Tensor) -> Tensor:
        peak = x.flatten(1).amax(dim=1).view(-1, 1, 1, 1)
        return x / (peak + 1e-12)

    def encode_pred(self, pred: Tensor) -> Tensor:
        return self._normalise(pred)

    def encode_target(self, target: Tensor) -> Tensor:
        return self._normalise(target)

    def distance(self, pred: Tensor, ref: Tensor) -> Tensor:
        """Mean ``|pred - ref|`` per image over all pixels and channels.

        Used where the reference is itself a mapped prediction (no label, so no invalid pixels).
        """
        return (pred - ref).abs().flatten(1).mean(dim=1)

    def critic_input(self, pred: Tensor) -> Tensor:
        """Divided by its largest magnitude per image: a discriminator sees shape, not scale."""
        peak = pred.abs().flatten(1).amax(1).view(-1, 1, 1, 1)
        return pred / (peak + 1e-6)

    def critic_label(self, target: Tensor) -> Tensor:
        return self.critic_input(target)

    def label_problem(self, label: np.ndarray) -> str | None:
        if (label < 0).any():
            return f"depth must be >= 0 (0 = invalid), found {float(label.min())}"
        return None

    def finalise(self, pred: Tensor) -> np.ndarray:
        """Depth (H,W) float32."""
        return pred[0].cpu().numpy().astype(np.float32)

    def save_prediction(self, array: np.ndarray, files: OutputFiles) -> None:
        """``<task>.png`` (viridis over the image's robust range), ``.npy`` (float32) and
        ``_16bit.png`` (uint16 mm)."""
        files.png(colourise_depth(array), self.name)
        files.npy(array, self.name)
        files.png(depth_to_mm16(array), f"{self.name}_16bit")

    def panels(self, target: Tensor | None, preds: Sequence[Tensor]) -> list[Cell]:
        label = None if target is None else target.numpy()
        return depth_cells(label, [p.numpy() for p in preds])
