"""``pseudo_label``: confident predictions of the model's own view0 as labels for view1.

Lee, "Pseudo-Label", ICML Workshops 2013, with the confidence threshold of FixMatch (Sohn et
al., NeurIPS 2020), for dense multi-task prediction with partial labels. Each training image
comes as two views, ``view1 = T(view0)`` (the training augmentation, as for ``ssl``). Labelled
tasks are supervised on view0 (Eq. 1 of paper 001). For every task an image is not labelled
for, the model's own view0 prediction (gradient stopped) is replayed through T onto view1's
geometry and turned into a hard label where it is confident (:meth:`Task.pseudo_label`); the
view1 prediction is trained on it with the task's own loss, over the confident pixels:

    L_pl(x) = sum_{t unlabelled in x, t has a confidence} L_t(pred_t(view1), PL_t(T(pred_t(view0))))

summed over an image's tasks (``normalize=mean``: their mean), averaged over the batch, times
``weight``. What "confident" means is the task's: for segmentation the largest class
probability reaches ``threshold`` (FixMatch's 0.95 by default); for binary maps (saliency,
edges) ``max(p, 1 - p)`` does. Depth and normals are regressions without a calibrated
confidence, so they get no pseudo-labels (their unlabelled images add nothing), rather than
an invented confidence. ``threshold=0`` is Lee's original (every pixel, the argmax).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mtpsl.data.batch import Batch
from mtpsl.data.transforms import replay
from mtpsl.methods.base import METHODS, Losses, Method, supervised_losses, two_view_forward
from mtpsl.methods.ssl import view1_geometry
from mtpsl.methods.terms import Normalize, per_image_mean
from mtpsl.models import ModelOutput
from mtpsl.tasks import Task


class PseudoLabelOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    weight: float = Field(default=1.0, ge=0.0)
    """Weight of the pseudo-label term."""
    threshold: float = Field(default=0.95, ge=0.0, le=1.0)
    """Confidence a pixel needs to become a pseudo-label (FixMatch: 0.95; 0 = Lee 2013)."""
    normalize: Normalize = "sum"
    """sum: an image's pseudo-labelled tasks are added (as ``ssl``); mean: their mean."""


def pseudo_label_terms(tasks: dict[str, Task], batch: Batch, preds0: dict[str, Tensor],
                       preds1: dict[str, Tensor], threshold: float,
                       normalize: Normalize = "sum") -> Tensor:
    """Per-image pseudo-label loss ``[B]`` (unweighted) over the unlabelled tasks that have a
    confidence."""
    crop, flip = view1_geometry(batch)
    total = _wide(preds1[next(iter(tasks))]).new_zeros(len(batch))
    count = torch.zeros_like(total)
    for name, task in tasks.items():
        unlabelled = ~batch.labelled_for(name)
        if not bool(unlabelled.any()):
            continue
        with torch.no_grad():
            moved = replay(task.as_map(_wide(preds0[name].detach())), crop, flip, task)
            target = task.pseudo_label(moved, threshold)
        if target is None:
            continue  # a regression task: no confidence, no pseudo-label
        per_image = task.loss(_wide(preds1[name]), target)
        mask = unlabelled.to(per_image.device)
        total = total + torch.where(mask, per_image, 0.0)
        count = count + mask.to(count)
    return per_image_mean(total, count, normalize)


def _wide(x: Tensor) -> Tensor:
    """fp32 for half-precision maps (autocast), float64 kept: losses never run in half."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


@METHODS.register("pseudo_label")
class PseudoLabel(Method):
    """Pseudo-Label (Lee 2013) with FixMatch's confidence threshold: the model's confident
    view0 predictions, replayed onto view1, supervise its unlabelled classification tasks."""

    n_views = 2
    Options = PseudoLabelOptions
    options: PseudoLabelOptions

    def compute(self, model: nn.Module, batch: Batch) -> tuple[Losses, ModelOutput]:
        preds0, preds1, features0 = two_view_forward(model, batch)
        losses = supervised_losses(self.tasks, batch, preds0)
        o: PseudoLabelOptions = self.options
        per_image = pseudo_label_terms(self.tasks, batch, preds0, preds1, o.threshold,
                                       o.normalize)
        extra = {"pseudo_label": o.weight * per_image.mean()}
        return Losses(tasks=losses, extra=extra), ModelOutput(preds0, features0)
