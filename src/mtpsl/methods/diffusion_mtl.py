"""DiffusionMTL (Ye & Xu, CVPR 2024), as its code trains the PASCAL feature-diffusion model
(``prismformore/DiffusionMTL`` at ``65b84e7``: ``losses/loss_schemes.py``,
``models/diffusion/mtdnet.py``). It needs its own network, ``method.network=diffusion_mtl``
(or ``model.name``)
(:mod:`mtpsl.models.diffusion_mtl`).

Per training image only the tasks it is labelled for are refined by the diffusion chain
(``forward(x, active=batch.labelled)``). Its loss is, per labelled task ``t``,
``L_t(final) + inter_weight L_t(intermediate)`` (each the task's per-image loss, the code's
``inter_loss_weight`` 0.5), the sum over its labelled tasks scaled by ``T / n_labels``
(``T`` tasks in the run, ``n_labels`` labelled for the image; ``label_balance=code``), and
images without labels add nothing. Each task's share, summed over its labelled images and
divided by the batch size, is that task's loss for the weighting: the code's fixed loss
weights are a ``constant`` weighting (or the tasks' ``loss_weight``) over these.

The denoising diffusion loss the code defines (``p_losses``: MSE of the x0 prediction of every
step to the clean feature) is never called there; ``diffusion_loss=mse`` adds it.
Departures: ``docs/fidelity.md``, section "diffusion_mtl".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mtpsl.core.errors import ConfigError
from mtpsl.data.batch import Batch
from mtpsl.methods.base import METHODS, Losses, Method, labelled_sum
from mtpsl.models import ModelOutput
from mtpsl.models.diffusion_mtl import DiffusionMTLNet, NoiseFn
from mtpsl.tasks import Task


class DiffusionMTLOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    inter_weight: float = Field(default=0.5, ge=0.0)
    """Weight of a labelled task's intermediate-prediction loss (the code's
    ``inter_loss_weight``)."""
    label_balance: Literal["code", "none"] = "code"
    """``code``: an image's losses times T / (its number of labelled tasks); ``none``: as they
    are (the plain partial-label sum of paper 001's Eq. 1)."""
    diffusion_loss: Literal["none", "mse"] = "none"
    """``none``: the code (its ``p_losses`` is never called); ``mse``: add, per labelled
    (image, task), the sum over the chain's steps of the mean squared error of the x0
    prediction to the detached initial feature, averaged over the batch."""
    diffusion_weight: float = Field(default=1.0, ge=0.0)
    """Weight of the ``mse`` diffusion loss (the code's ``l_simple_weight``)."""


def image_scale(labelled: Tensor, balance: str) -> Tensor:
    """Per-image factor ``[B]``: T / n_labels (0 without labels) or 1."""
    if balance == "none":
        return torch.ones(len(labelled), device=labelled.device)
    n = labelled.sum(1)
    return torch.where(n > 0, labelled.shape[1] / n.clamp(min=1), 0.0)


def diffusion_losses(tasks: Mapping[str, Task], batch: Batch, out: ModelOutput,
                     options: DiffusionMTLOptions) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Each task's loss (for the weighting) and its final and intermediate components (logs),
    from a forward with ``active=batch.labelled``."""
    scale = image_scale(batch.labelled, options.label_balance)
    losses, logs = {}, {}
    for name, task in tasks.items():
        target = batch.targets[name]
        final = task.loss(out.preds[name], target)
        inter = task.loss(out.features[f"inter/{name}"], target)
        losses[name] = labelled_sum((final + options.inter_weight * inter) * scale.to(final.dtype),
                                    batch, name)
        logs[f"final_{name}"] = labelled_sum(final, batch, name)
        logs[f"inter_{name}"] = labelled_sum(inter, batch, name)
    return losses, logs


def diffusion_mse(tasks: Mapping[str, Task], batch: Batch, out: ModelOutput) -> Tensor:
    """Sum over labelled (image, task) and steps of ``mean (x0 - f.detach())^2``, divided by
    the batch size (``mtdnet.py`` 452-470 with the x0 target; needs ``trace=True``)."""
    total = torch.zeros((), device=batch.labelled.device)
    for name in tasks:
        x0 = out.features[f"x0/{name}"]
        clean = out.features[f"clean/{name}"].detach().unsqueeze(1)
        per_image = (x0 - clean).pow(2).mean(dim=(2, 3, 4)).sum(1)
        total = total + labelled_sum(per_image, batch, name)
    return total


@METHODS.register("diffusion_mtl")
class DiffusionMTL(Method):
    """DiffusionMTL (Ye & Xu, CVPR 2024): a multi-task conditioned denoising diffusion refines
    the initial predictions of the labelled tasks (needs ``method.network=diffusion_mtl`` or
    ``model.name=diffusion_mtl``).
    Options: :class:`DiffusionMTLOptions`."""

    Options = DiffusionMTLOptions
    options: DiffusionMTLOptions
    contract_model = "diffusion_mtl"
    noise: NoiseFn | None = None
    """Noise of the chain (None: the model's Gaussian draws); tests fix it."""

    def attach(self, model: nn.Module) -> None:
        """Refuse any network but DiffusionMTL's (its forward takes the labels)."""
        if not isinstance(model, DiffusionMTLNet):
            raise ConfigError(
                f"method.network: method diffusion_mtl trains the DiffusionMTL network; set "
                f"method.network=diffusion_mtl (or model.name=diffusion_mtl; this model is "
                f"{type(model).__name__})")

    def compute(self, model: nn.Module, batch: Batch) -> tuple[Losses, ModelOutput]:
        mse = self.options.diffusion_loss == "mse"
        out = model(batch.image, active=batch.labelled, noise=self.noise, trace=mse)
        losses, logs = diffusion_losses(self.tasks, batch, out, self.options)
        extra = {}
        if mse:
            extra["diffusion_mse"] = self.options.diffusion_weight * diffusion_mse(
                self.tasks, batch, out)
        return Losses(losses, extra, logs), out
