"""``mean_teacher``: an EMA teacher's predictions as targets for the unlabelled tasks.

Tarvainen & Valpola, "Mean teachers are better role models", NeurIPS 2017, adapted to dense
multi-task prediction with partial labels. Each training image comes as two views,
``view1 = T(view0)`` (the training augmentation, as for ``ssl``). The student (the model being
trained) is supervised on view0's labelled tasks (Eq. 1 of paper 001); for every task an image
is *not* labelled for, its prediction on view1 must match the teacher's prediction on view0
carried through the same geometry:

    L_mt(x) = sum_{t unlabelled in x} MSE( T(teacher_t(view0)), student_t(view1) )

with the MSE over pixels and channels (segmentation compares class probabilities), summed over
an image's unlabelled tasks (``normalize=mean``: their mean), averaged over the batch, times
``weight * ramp(epoch)``. The ramp is the paper's sigmoid ``exp(-5 (1 - e / rampup_epochs)^2)``
for ``e < rampup_epochs`` (1 after; ``rampup_epochs=0``: no ramp). The targets carry no
gradient: this is :func:`~mtpsl.methods.ssl.crop_consistency` with the teacher's view0 instead
of the student's, so the only difference from ``ssl`` is where the target comes from.

The teacher is a copy of the model made in :meth:`attach`, with ``requires_grad=False``, so no
optimiser ever holds it (:meth:`~mtpsl.methods.base.Method.optimizer_groups`). After every
optimiser step (:meth:`after_step`) each floating-point entry of its state (weights and
BatchNorm statistics, as timm's ``ModelEmaV2``) becomes ``a * teacher + (1 - a) * student`` with
the paper's warm-up ``a = min(1 - 1 / (k + 1), decay)`` at update ``k`` (so the first update
copies the student); integer entries are copied. The teacher predicts in eval mode (its own
averaged BatchNorm statistics, no dropout), under no_grad. Teacher and update count live in
the method's state dict, so checkpoints carry them and a resume continues them exactly.
"""

from __future__ import annotations

import copy
import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mtpsl.data.batch import Batch
from mtpsl.methods.base import METHODS, Losses, Method, supervised_losses, two_view_forward
from mtpsl.methods.ssl import crop_consistency
from mtpsl.methods.terms import Normalize
from mtpsl.models import ModelOutput


class MeanTeacherOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    weight: float = Field(default=1.0, ge=0.0)
    """Weight of the consistency term (after the ramp-up)."""
    decay: float = Field(default=0.99, ge=0.0, lt=1.0)
    """EMA decay of the teacher (0.99 in the paper's ramp-up phase, 0.999 later)."""
    rampup_epochs: int = Field(default=0, ge=0)
    """Sigmoid ramp-up of the weight over this many epochs; 0 = full weight from the start."""
    normalize: Normalize = "sum"
    """sum: an image's unlabelled-task terms are added (as ``ssl``); mean: their mean."""


def sigmoid_rampup(epoch: int, rampup_epochs: int) -> float:
    """``exp(-5 (1 - t)^2)`` with ``t = epoch / rampup_epochs`` (Laine & Aila; Tarvainen &
    Valpola), 1 from ``rampup_epochs`` on."""
    if rampup_epochs == 0 or epoch >= rampup_epochs:
        return 1.0
    t = max(0.0, epoch / rampup_epochs)
    return math.exp(-5.0 * (1.0 - t) ** 2)


@METHODS.register("mean_teacher")
class MeanTeacher(Method):
    """Mean Teacher (Tarvainen & Valpola 2017): an EMA teacher's view0 predictions, replayed
    onto view1, are the targets of the student's unlabelled tasks."""

    n_views = 2
    Options = MeanTeacherOptions
    options: MeanTeacherOptions
    updates: Tensor

    def __init__(self, tasks, options: MeanTeacherOptions) -> None:
        super().__init__(tasks, options)
        self.teacher: nn.Module | None = None  # built by attach(), a copy of the model
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))
        self.ramp = sigmoid_rampup(0, options.rampup_epochs)

    def attach(self, model: nn.Module) -> None:
        self.teacher = copy.deepcopy(model).requires_grad_(False)

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        self.ramp = sigmoid_rampup(epoch, self.options.rampup_epochs)

    def compute(self, model: nn.Module, batch: Batch) -> tuple[Losses, ModelOutput]:
        preds0, preds1, features0 = two_view_forward(model, batch)
        losses = supervised_losses(self.tasks, batch, preds0)
        targets = self.teacher_predictions(batch.views[0].image)
        o: MeanTeacherOptions = self.options
        per_image = crop_consistency(self.tasks, batch, targets, preds1, detach_target=True,
                                     normalize=o.normalize)
        extra = {"mean_teacher": o.weight * self.ramp * per_image.mean()}
        return Losses(tasks=losses, extra=extra), ModelOutput(preds0, features0)

    @torch.no_grad()
    def teacher_predictions(self, image: Tensor) -> dict[str, Tensor]:
        """The teacher's predictions in eval mode (its averaged statistics), without grad."""
        if self.teacher is None:
            raise RuntimeError("mean_teacher: attach(model) builds the teacher first")
        self.teacher.eval()
        return {k: v.float() for k, v in self.teacher(image).preds.items()}

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        # The warm-up decay computed on the device: no host sync per step.
        decay = (1.0 - 1.0 / (self.updates + 1).double()).clamp(max=self.options.decay)
        if self.teacher is None:
            raise RuntimeError("mean_teacher: attach(model) builds the teacher first")
        student = model.state_dict()
        for key, value in self.teacher.state_dict().items():
            source = student[key].to(value.device)
            if value.is_floating_point():
                value.lerp_(source.to(value.dtype), (1.0 - decay).to(value.dtype))
            else:
                value.copy_(source)
        self.updates += 1
