"""Supervised baselines on partial labels: each task learns only from the images labelled for it.

- ``stl``: single-task learning, one independent network per task (the reference of Delta_m).
- ``sl``: multi-task learning with a shared network, Eq. 1 of Li, Liu & Bilen (CVPR 2022).
"""

from __future__ import annotations

from torch import nn

from mtpsl.data.batch import Batch
from mtpsl.methods.base import METHODS, Losses, Method, supervised_losses
from mtpsl.models import ModelOutput


@METHODS.register("sl")
class SupervisedMultiTask(Method):
    """One shared network; the loss sums each image's labelled tasks (unlabelled ones add 0)."""

    def compute(self, model: nn.Module, batch: Batch) -> tuple[Losses, ModelOutput]:
        out = model(batch.image)
        return Losses(supervised_losses(self.tasks, batch, out.preds)), out


@METHODS.register("stl")
class SingleTask(SupervisedMultiTask):
    """Same losses, but the trainer builds one independent network per task."""

    per_task_networks = True
