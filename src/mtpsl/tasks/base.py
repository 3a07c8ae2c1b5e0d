"""The task contract: what a dense prediction task is, independent of any dataset or method.

A task says how many channels its head predicts and how they are activated, how a label is
stored in a batch and which pixels are valid, its per-image loss, how a joint spatial
augmentation must treat its label (interpolation, what a rescale or a flip does to the values),
how predictions and labels are encoded as input to a mapping network, its metric, and how a
prediction is shown in a figure and written to files by ``mtpsl predict``. Code outside a task
asks these methods; it never tests a task's type.

Adding a task type is one new module in this package with one registered subclass (see
``docs/extending.md``). Datasets create task *instances* with a name (the key of the task's
tensors in every batch), e.g. ``build_task("segmentation", "semantic", num_classes=13)``.

Batch formats (B images, H x W): segmentation ``int64 [B,H,W]`` with -1 = ignore; depth
``float [B,1,H,W]`` with 0 = invalid; normals ``float [B,3,H,W]`` unit vectors, all-zero =
invalid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from mtpsl.core.errors import MtpslError
from mtpsl.core.registry import Registry

if TYPE_CHECKING:
    from mtpsl.core.render import Cell, OutputFiles

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
    continuous: ClassVar[bool] = False
    """A scalar on a continuous scale (depth), where robust regression losses such as BerHu
    apply."""
    contract_options: ClassVar[Mapping[str, Any]] = {}
    """Options of a small instance, which ``tests/test_registries.py`` builds this task type
    with to check it against this contract: a task type with a required option names a value
    here, so a new file is checked without editing the test."""

    @property
    def out_channels(self) -> int:
        return self.channels

    alternative_metrics: ClassVar[dict[str, str]] = {}
    """Other registered metrics an instance may be scored with (:meth:`metric_name`), each
    with its primary key; reports recognise their keys too."""

    def metric_name(self) -> str:
        """The registered metric this instance is scored with: ``metric`` unless the task
        offers an alternative measure and the instance chose it."""
        return self.metric

    def with_scoring(self, measure: str | None = None, workers: int | None = None) -> Task:
        """This task scored with another of its measures (edges: ``"bsds"``, ``"dilation"``)
        or evaluation processes; a task with a single in-process measure returns itself."""
        return self

    def primary_key(self) -> str:
        """The key of this instance's metric that stands for the task in Delta_m."""
        name = self.metric_name()
        return self.primary_metric if name == self.metric else self.alternative_metrics[name]

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

    def encode_pred_eval(self, pred: Tensor) -> Tensor:
        """:meth:`encode_pred` without sampling noise (figures of a mapping network's input)."""
        return self.encode_pred(pred)

    def hard_label(self, pred: Tensor) -> Tensor:
        """A prediction ``[B, C, H, W]`` in the batch format of a label (segmentation: the
        argmax class map); used to fill a label's holes from the model's own guess."""
        return pred

    def critic_input(self, pred: Tensor) -> Tensor:
        """A prediction as input to a network that judges it (SemiMTL's discriminators):
        bounded, and scale-free where the task has a scale."""
        return self.encode_pred(pred)

    def critic_label(self, target: Tensor) -> Tensor:
        """A hole-free label in the input space of :meth:`critic_input`."""
        return self.encode_target(target)

    def reconstruction_loss(self, logits: Tensor, target: Tensor, mask: Tensor,
                            count: Tensor | None = None) -> Tensor:
        """Per-image loss ``[N]`` of decoder ``logits`` reconstructing an encoded map ``target``
        (:meth:`encode_target`'s space) over the pixels of ``mask`` ``[N, H, W]``: a joint-task
        auto-encoder's (JTR's) reconstruction term. Summed over the mask and divided by
        ``count`` ``[N]`` when given (JTR's code divides by the target's non-zero elements),
        else averaged over the mask's pixels. Default: L1 between the sigmoid of the logits
        (squeezed by 1e-5 about 0.5, as JTR's code) and the target, summed over channels."""
        squeezed = (torch.sigmoid(logits) - 0.5) * (1.0 - 1e-5) + 0.5
        return masked_pixel_mean((squeezed - target).abs().sum(dim=1), mask, count)

    def after_interpolation(self, target: Tensor) -> Tensor:
        """Restore a label's invariants after interpolation blended its values (unit
        normals); the identity for most tasks."""
        return target

    def label_problem(self, label: np.ndarray) -> str | None:
        """What is wrong with a label array read from disk (in the dataset's stored form),
        or None; datasets put the file name in front."""
        return None

    # -------------------------------------------------------------------- outputs

    def finalise(self, pred: Tensor) -> np.ndarray:
        """A full-size activated prediction ``[C, H, W]`` as the array ``mtpsl predict``
        writes (default: float32 ``(H, W, C)``)."""
        return pred.permute(1, 2, 0).cpu().numpy().astype(np.float32)

    def save_prediction(self, array: np.ndarray, files: OutputFiles) -> None:
        """Write a :meth:`finalise`-d prediction as this task's files (default: ``.npy``)."""
        files.npy(array, self.name)

    def prediction_palette(self) -> np.ndarray | None:
        """uint8 ``[C, 3]``: the colour of each class id in the picture :meth:`save_prediction`
        writes, for a task that predicts a class map (recorded in checkpoints); else None."""
        return None

    def panels(self, target: Tensor | None, preds: Sequence[Tensor]) -> list[Cell]:
        """Figure cells of one image: the label's (unless None), then one per prediction
        (unbatched batch-format label, activated predictions)."""
        raise MtpslError(f"task {self.name!r} ({type(self).__name__}) has no figure display")


def masked_pixel_mean(per_pixel: Tensor, mask: Tensor, count: Tensor | None = None) -> Tensor:
    """Mean of ``[N, H, W]`` values over each image's ``mask`` pixels (0 where it has none);
    with ``count`` ``[N]``, their sum divided by it instead."""
    mask = mask.to(per_pixel.dtype)
    total = (per_pixel * mask).flatten(1).sum(1)
    return total / (mask.flatten(1).sum(1).clamp(min=1) if count is None else count)


def broadcast_scale(scale: float | Tensor, like: Tensor) -> float | Tensor:
    if isinstance(scale, Tensor) and scale.ndim == 1:
        return scale.view(-1, *([1] * (like.ndim - 1))).to(like)
    return scale


def build_task(kind: str, name: str, **kwargs) -> Task:
    """Create a named task instance of a registered type."""
    return TASKS.get(kind)(name=name, **kwargs)


def task_kind(task: Task) -> str | None:
    """The task type's registry name (``build_task``'s ``kind``), None if unregistered."""
    return next((k for k in TASKS.names() if TASKS.get(k) is type(task)), None)
