"""Surface normals: unit vectors per pixel."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mtpsl.core.render import Cell, OutputFiles, colour_normals, unit_to_u8
from mtpsl.tasks.base import TASKS, Interpolation, Task, masked_pixel_mean


@TASKS.register("normal")
@dataclass(frozen=True)
class NormalTask(Task):
    """Surface normals as unit vectors; loss 1 - cos over pixels with a non-zero label.

    ``loss_kind="l1"`` is the PASCAL-Context benchmark's loss instead: the L1 distance (summed
    over the 3 channels) between the unit prediction and the label.
    """

    loss_kind: Literal["cosine", "l1"] = "cosine"

    channels: ClassVar[int] = 3
    interpolation: ClassVar[Interpolation] = "bilinear"
    metric: ClassVar[str] = "normal"
    primary_metric: ClassVar[str] = "mean"
    label_dims: ClassVar[int] = 3

    def activate(self, raw: Tensor) -> Tensor:
        return F.normalize(raw, p=2, dim=1, eps=1e-12)

    def valid(self, target: Tensor) -> Tensor:
        return (target != 0).any(dim=1)

    def pixel_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        if self.loss_kind == "l1":
            return (pred - target).abs().sum(dim=1)
        return 1.0 - (pred * target).sum(dim=1)

    def on_hflip(self, target: Tensor) -> Tensor:
        # Mirroring the image mirrors the surfaces: the x component changes sign.
        return torch.cat([-target[:, :1], target[:, 1:]], dim=1)

    def encode_pred(self, pred: Tensor) -> Tensor:
        return (pred + 1.0) / 2.0

    def encode_target(self, target: Tensor) -> Tensor:
        return (target + 1.0) / 2.0

    def distance(self, pred: Tensor, ref: Tensor) -> Tensor:
        """Mean ``1 - cos`` (dot product of the unit vectors) per image over all pixels.

        Used where the reference is itself a mapped prediction (no label, so no invalid pixels).
        """
        return (1.0 - (pred * ref).sum(dim=1)).flatten(1).mean(dim=1)

    def reconstruction_loss(self, logits: Tensor, target: Tensor, mask: Tensor,
                            count: Tensor | None = None) -> Tensor:
        """``1 - cos`` between the normalised logits and the normal ``2 target - 1``; with
        ``count``, JTR's code's form ``1 - (sum of the cosines over the mask) / count``."""
        unit = F.normalize(logits, p=2, dim=1, eps=1e-12)
        cos = (unit * (2.0 * target - 1.0)).sum(dim=1)
        if count is None:
            return masked_pixel_mean(1.0 - cos, mask)
        return 1.0 - masked_pixel_mean(cos, mask, count)

    def after_interpolation(self, target: Tensor) -> Tensor:
        """L2-normalise non-zero vectors; zero (invalid) pixels stay zero."""
        norm = target.norm(dim=1, keepdim=True)
        return torch.where(norm > 0, target / norm.clamp(min=1e-12), target)

    def finalise(self, pred: Tensor) -> np.ndarray:
        """Unit normals (H,W,3) float32 (re-normalised after resizing / tile averaging)."""
        pred = F.normalize(pred, p=2, dim=0, eps=1e-12)
        return pred.permute(1, 2, 0).cpu().numpy().astype(np.float32)

    def save_prediction(self, array: np.ndarray, files: OutputFiles) -> None:
        """``<task>.png`` ((n + 1) / 2 * 255) and ``.npy`` (float32 H,W,3)."""
        files.png(unit_to_u8(array), self.name)
        files.npy(array, self.name)

    def panels(self, target: Tensor | None, preds: Sequence[Tensor]) -> list[Cell]:
        maps = ([] if target is None else [target.numpy()]) + [p.numpy() for p in preds]
        return [(colour_normals(m), {}) for m in maps]
