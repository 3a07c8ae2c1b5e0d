"""Task definitions: what a dense prediction task is, independent of any dataset or method.

A task says how many channels its head predicts and how they are activated, how a label is
stored in a batch and which pixels are valid, its per-image loss, how a joint spatial
augmentation must treat its label (interpolation, what a rescale or a flip does to the values),
how predictions and labels are encoded as input to a mapping network, and its metric.

Adding a task type is one registered class here. Datasets create task *instances* with a name
(the key of the task's tensors in every batch), e.g. ``build_task("segmentation", "semantic",
num_classes=13)``.

Batch formats (B images, H x W): segmentation ``int64 [B,H,W]`` with -1 = ignore; depth
``float [B,1,H,W]`` with 0 = invalid; normals ``float [B,3,H,W]`` unit vectors, all-zero =
invalid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import Registry

TASKS: Registry[type[Task]] = Registry("task type")

Interpolation = Literal["bilinear", "nearest"]


@dataclass(frozen=True)
class Task:
    """Base task. Subclasses fill in the class variables and the label-specific methods."""

    name: str
    loss_weight: float = 1.0
    """Factor on the per-image loss: a benchmark's fixed task weights (PASCAL-Context: 1, 2,
    10, 5, 50). 1.0 leaves the loss untouched bit for bit."""

    channels: ClassVar[int]
    interpolation: ClassVar[Interpolation]
    metric: ClassVar[str]
    primary_metric: ClassVar[str]
    """The metric that stands for the task in the multi-task gain Delta_m."""
    label_dims: ClassVar[int]
    """Channels of the stored label; 0 means a channel-less map (class indices)."""

    @property
    def out_channels(self) -> int:
        return self.channels

    def metric_kwargs(self) -> dict:
        return {}

    def activate(self, raw: Tensor) -> Tensor:
        return raw

    def valid(self, target: Tensor) -> Tensor:
        """Boolean ``[B,H,W]`` mask of pixels that carry a label."""
        raise NotImplementedError

    def pixel_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Unreduced loss ``[B,H,W]``; only valid pixels are read by :meth:`loss`."""
        raise NotImplementedError

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Per-image loss ``[B]``: the mean over that image's valid pixels (0 if it has none).

        Per-image (not per-batch) reduction is what lets a method weight each image by whether
        it is labelled for this task.
        """
        valid = self.valid(target)
        per_pixel = torch.where(valid, self.pixel_loss(pred, target), 0.0)
        count = valid.flatten(1).sum(1)
        per_image = per_pixel.flatten(1).sum(1) / count.clamp(min=1)
        return per_image if self.loss_weight == 1.0 else per_image * self.loss_weight

    def blank_like(self, target: Tensor) -> Tensor:
        """A label of the same shape with every pixel invalid (hides an unlabelled target)."""
        return torch.zeros_like(target)

    def on_rescale(self, target: Tensor, scale: float | Tensor) -> Tensor:
        """Fix label values after a zoom by ``scale`` (geometry-aware tasks override)."""
        return target

    def on_hflip(self, target: Tensor) -> Tensor:
        """Fix label values after a horizontal flip (the pixels are already flipped)."""
        return target

    def encode_pred(self, pred: Tensor) -> Tensor:
        """Map a prediction into the input space of a cross-task mapping network."""
        return pred

    def encode_target(self, target: Tensor) -> Tensor:
        """Map a label into the same input space as :meth:`encode_pred`."""
        return target

    def distance(self, pred: Tensor, ref: Tensor) -> Tensor:
        """Per-image distance ``[B]`` between two predictions, averaged over all pixels.

        Used where the reference is itself a mapped prediction (e.g. a mapping network applied
        to a label): there is no label, so no invalid pixels and no validity mask.
        """
        raise NotImplementedError

    def as_map(self, pred: Tensor) -> Tensor:
        """A prediction as the map that consistency and cosine terms compare (segmentation:
        probabilities instead of log-probabilities)."""
        return pred

    def label_map(self, target: Tensor) -> Tensor:
        """A label as a map of :meth:`as_map`'s shape ``[B, C, H, W]`` (zero where invalid)."""
        return torch.where(self.valid(target).unsqueeze(1), target, 0.0)

    def pseudo_label(self, prob_map: Tensor, threshold: float) -> Tensor | None:
        """A hard label from an :meth:`as_map` map, invalid where the confidence is below
        ``threshold``; None for a task without a confidence (regression: depth, normals)."""
        return None


@TASKS.register("segmentation")
@dataclass(frozen=True)
class SegmentationTask(Task):
    """Per-pixel classification; the head outputs log-probabilities (NLL loss, -1 ignored)."""

    num_classes: int = 13

    channels: ClassVar[int] = 0  # overridden by out_channels
    interpolation: ClassVar[Interpolation] = "nearest"
    metric: ClassVar[str] = "segmentation"
    primary_metric: ClassVar[str] = "miou"
    label_dims: ClassVar[int] = 0
    ignore_index: ClassVar[int] = -1

    @property
    def out_channels(self) -> int:
        return self.num_classes

    def metric_kwargs(self) -> dict:
        return {"num_classes": self.num_classes}

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


@TASKS.register("depth")
@dataclass(frozen=True)
class DepthTask(Task):
    """Per-pixel depth (metres) or disparity; masked L1 over pixels with a non-zero label."""

    channels: ClassVar[int] = 1
    interpolation: ClassVar[Interpolation] = "nearest"
    metric: ClassVar[str] = "depth"
    primary_metric: ClassVar[str] = "abs_err"
    label_dims: ClassVar[int] = 1

    def valid(self, target: Tensor) -> Tensor:
        return (target != 0).any(dim=1) & torch.isfinite(target).all(dim=1)

    def pixel_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return (pred - target).abs().sum(dim=1)

    def on_rescale(self, target: Tensor, scale: float | Tensor) -> Tensor:
        # Zooming in by s brings the scene s times closer (the reference divides by s).
        return target / _broadcast_scale(scale, target)

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


def _broadcast_scale(scale: float | Tensor, like: Tensor) -> float | Tensor:
    if isinstance(scale, Tensor) and scale.ndim == 1:
        return scale.view(-1, *([1] * (like.ndim - 1))).to(like)
    return scale


def build_task(kind: str, name: str, **kwargs) -> Task:
    """Create a named task instance of a registered type."""
    return TASKS.get(kind)(name=name, **kwargs)


def task_kind(task: Task) -> str | None:
    """The task type's registry name (``build_task``'s ``kind``), None if unregistered."""
    return next((k for k in TASKS.names() if TASKS.get(k) is type(task)), None)
