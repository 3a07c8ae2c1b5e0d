"""The ``ssl`` baseline of paper 001 (Li, Liu & Bilen, CVPR 2022), Eq. 2: crop consistency.

Each training image comes as two views, ``view1 = T(view0)`` with T the training augmentation
(scale-crop, and flips where the dataset uses them). Labelled tasks are supervised on view0
(Eq. 1); for every task an image is *not* labelled for, the prediction on view1 must agree with
the prediction on view0 carried through the same geometry:

    L_ssl(x) = sum_{t unlabelled in x} MSE( T(f_t(view0)), f_t(view1) )

``T(.)`` is :func:`~mtpsl.data.transforms.replay` of the crop/flip recorded for view1 (depth is
divided by the zoom, normal x negated on a flip). The MSE is the mean over pixels and channels
of one image; segmentation compares class probabilities (exp of the log-probabilities). The
term is summed over an image's unlabelled tasks (``normalize=mean``: divided by their number,
the paper's 1/|U_n|), averaged over the batch, and scaled by ``weight``. Both views go
through the network in one forward pass over ``cat[view0, view1]``, so BatchNorm statistics
are shared, as the reference does for its two-view methods.

Departures from the papers and reference code, with the options and tests that pin them:
``docs/fidelity.md``, section "baselines of paper 001".
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from mtpsl.data.batch import Batch
from mtpsl.data.transforms import replay
from mtpsl.methods.base import METHODS, Losses, Method, supervised_losses, two_view_forward
from mtpsl.methods.terms import Normalize, per_image_mean
from mtpsl.models import ModelOutput
from mtpsl.tasks import Task


class SSLOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    weight: float = 1.0
    """Scale of the consistency term."""
    detach_target: bool = False
    """Treat the replayed view0 prediction as a fixed target (no gradient through it)."""
    normalize: Normalize = "sum"
    """sum: an image's unlabelled-task terms are added (the official XTC code's convention);
    mean: divided by their number, the 1/|U_n| of the paper's Eq. 2 (docs/fidelity.md)."""


def view1_geometry(batch: Batch) -> tuple[Tensor, Tensor]:
    """The crop ``[B, 3]`` and flip ``[B]`` that made view1 from view0 (see ``replay``)."""
    meta = batch.views[1].meta
    if "crop" not in meta or "flip" not in meta:
        raise ValueError(
            "two-view methods need the augmentation record ('crop', 'flip') of view1; build "
            "the training set with a transform from mtpsl.data.transforms"
        )
    return meta["crop"], meta["flip"]


def crop_consistency(
    tasks: dict[str, Task],
    batch: Batch,
    preds0: dict[str, Tensor],
    preds1: dict[str, Tensor],
    detach_target: bool = False,
    normalize: Normalize = "sum",
) -> Tensor:
    """Per-image consistency ``[B]`` of Eq. 2 (unweighted): summed over unlabelled tasks, or
    their mean (``normalize="mean"``)."""
    crop, flip = view1_geometry(batch)
    total = preds0[next(iter(tasks))].new_zeros(len(batch))
    count = torch.zeros_like(total)
    for name, task in tasks.items():
        unlabelled = ~batch.labelled_for(name)
        if not bool(unlabelled.any()):
            continue  # labelled on every image: nothing to enforce
        count = count + unlabelled.to(count)
        target = replay(task.as_map(preds0[name]), crop, flip, task)
        if detach_target:
            target = target.detach()
        per_image = (target - task.as_map(preds1[name])).pow(2).flatten(1).mean(1)
        total = total + torch.where(unlabelled.to(per_image.device), per_image, 0.0)
    return per_image_mean(total, count, normalize)


@METHODS.register("ssl")
class CropConsistency(Method):
    """Eq. 2 of paper 001: supervised loss on view0 + crop consistency on unlabelled tasks."""

    n_views = 2
    Options = SSLOptions
    options: SSLOptions

    def compute(self, model: nn.Module, batch: Batch) -> tuple[Losses, ModelOutput]:
        preds0, preds1, features0 = two_view_forward(model, batch)
        losses = supervised_losses(self.tasks, batch, preds0)
        options: SSLOptions = self.options
        per_image = crop_consistency(self.tasks, batch, preds0, preds1, options.detach_target,
                                     options.normalize)
        extra = {"ssl": options.weight * per_image.mean()}
        return Losses(tasks=losses, extra=extra), ModelOutput(preds0, features0)
