"""Semantic segmentation (and any per-pixel classification, e.g. human parts)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mtpsl.core.palette import default_class_colours
from mtpsl.core.render import Cell, OutputFiles, colour_segmentation
from mtpsl.tasks.base import TASKS, Interpolation, Task, masked_pixel_mean


@TASKS.register("segmentation")
@dataclass(frozen=True)
class SegmentationTask(Task):
    """Per-pixel classification; the head outputs log-probabilities (NLL loss, -1 ignored).

    ``absent_class`` is the metric's rule for a class absent from labels and predictions:
    ``skip`` (left out of mIoU) or ``zero`` (an IoU of 0, the PASCAL-Context benchmark's).
    """

    num_classes: int = 13
    absent_class: Literal["skip", "zero"] = "skip"

    channels: ClassVar[int] = 0  # overridden by out_channels
    interpolation: ClassVar[Interpolation] = "nearest"
    metric: ClassVar[str] = "segmentation"
    primary_metric: ClassVar[str] = "miou"
    label_dims: ClassVar[int] = 0
    ignore_index: ClassVar[int] = -1

    @property
    def out_channels(self) -> int:
        return self.num_classes

    def __post_init__(self) -> None:
        if self.absent_class not in ("skip", "zero"):
            raise ValueError(f"segmentation task {self.name!r}: absent_class must be 'skip' or "
                             f"'zero', got {self.absent_class!r}")

    def metric_kwargs(self) -> dict:
        if self.absent_class == "skip":
            return {"num_classes": self.num_classes}
        return {"num_classes": self.num_classes, "absent_class": self.absent_class}

    def activate(self, raw: Tensor) -> Tensor:
        return F.log_softmax(raw, dim=1)

    def valid(self, target: Tensor) -> Tensor:
        return (target >= 0) & (target < self.num_classes)

    def pixel_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        safe = torch.where(self.valid(target), target, 0)
        return F.nll_loss(pred, safe, reduction="none")

    def blank_like(self, target: Tensor) -> Tensor:
        return torch.full_like(target, self.ignore_index)

    def encode_pred(self, pred: Tensor) -> Tensor:
        # Straight-through hard Gumbel sample: a one-hot map like the label's, with gradients.
        return F.gumbel_softmax(pred, tau=1.0, hard=True, dim=1)

    def encode_target(self, target: Tensor) -> Tensor:
        valid = self.valid(target)
        onehot = F.one_hot(torch.where(valid, target, 0), self.num_classes)
        onehot = onehot * valid.unsqueeze(-1)
        return onehot.permute(0, 3, 1, 2).to(torch.float32)

    def as_map(self, pred: Tensor) -> Tensor:
        return pred.exp()

    def label_map(self, target: Tensor) -> Tensor:
        return self.encode_target(target)

    def pseudo_label(self, prob_map: Tensor, threshold: float) -> Tensor:
        """The most probable class where its probability reaches ``threshold``, else -1."""
        confidence, classes = prob_map.max(dim=1)
        return torch.where(confidence >= threshold, classes, -1)

    def distance(self, pred: Tensor, ref: Tensor) -> Tensor:
        """Cross-entropy of ``pred`` against the soft distribution ``exp(ref)``, per image.

        Both are log-probabilities. Used where the reference is itself a mapped prediction (no
        label, so no invalid pixels): the mean over all pixels.
        """
        return -(ref.exp() * pred).sum(dim=1).flatten(1).mean(dim=1)

    def encode_pred_eval(self, pred: Tensor) -> Tensor:
        """The one-hot of the argmax: the hard Gumbel sample without its noise."""
        onehot = F.one_hot(pred.argmax(dim=1), pred.shape[1])
        return onehot.permute(0, 3, 1, 2).to(pred.dtype)

    def reconstruction_loss(self, logits: Tensor, target: Tensor, mask: Tensor,
                            count: Tensor | None = None) -> Tensor:
        """Binary cross-entropy of each class channel's logit against the (one-hot or soft)
        class map, summed over classes."""
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(dim=1)
        return masked_pixel_mean(bce, mask, count)

    def hard_label(self, pred: Tensor) -> Tensor:
        return pred.argmax(dim=1)

    def critic_input(self, pred: Tensor) -> Tensor:
        return pred.exp()

    def label_problem(self, label: np.ndarray) -> str | None:
        if label.dtype.kind == "f" and not (label == np.round(label)).all():
            return "class labels must be integer-valued"
        labels = torch.from_numpy(label.astype(np.int64))
        bad = ~self.valid(labels[None])[0] & (labels != self.ignore_index)
        if not bad.any():
            return None
        values = sorted(set(labels[bad].unique().tolist()))[:10]
        return (f"label values {values} outside the classes of task {self.name!r} "
                f"(allowed 0..{self.num_classes - 1} and {self.ignore_index} = ignore)")

    def finalise(self, pred: Tensor) -> np.ndarray:
        """Class ids (H,W) int64."""
        return pred.argmax(dim=0).cpu().numpy()

    def save_prediction(self, array: np.ndarray, files: OutputFiles) -> None:
        """``<task>.png`` in the run's class colours (:mod:`mtpsl.core.palette`) and
        ``<task>_index.png`` with the class ids."""
        files.png(files.class_colours(self.name, self.num_classes)[array], self.name)
        files.png(array.astype(np.uint8 if self.num_classes <= 256 else np.uint16),
                  f"{self.name}_index")

    def prediction_palette(self) -> np.ndarray:
        """The palette's class colours of ids ``0..C-1`` (never black: black is void), as
        :meth:`save_prediction` paints them."""
        return default_class_colours(self.num_classes)

    def panels(self, target: Tensor | None, preds: Sequence[Tensor]) -> list[Cell]:
        labels = [] if target is None else [target.numpy()]
        labels += [p.numpy().argmax(0) for p in preds]
        return [(colour_segmentation(ids, self.num_classes), {}) for ids in labels]
