"""``hitts``: Hierarchical Task Tokens (Zhang, Ye, Li, Wang & Xu, ACM MM 2025), as its code
defines the training (``Evergreen0929/EEMTL`` at ``a2c13c4``, folder ``HiTTs/``:
``losses/loss_schemes.py`` ``SemiSupervisedMultiTaskTokenLoss``, ``main_distill.py``).

Two stages, each an ordinary run (``method.options.stage``); the network is the ``hitts``
model (:mod:`mtpsl.models.hitts`), though any model trains (without its feature terms and
bin classification, which need the model's ``hitts/...`` features and ``codebook``).

**Stage 1** trains on the labels alone. Per image and labelled task: the task's loss and, for
a head that classifies over depth bins or normal centres, ``cls_weight`` (0.1) times the
cross-entropy of its logits against the nearest bin / most aligned centre of the label
(invalid pixels ignored), times the task's ``loss_weight`` like the loss itself.

**Stage 2** retrains a fresh network with the stage-1 run as a frozen teacher (eval mode, no
gradient; ``method.options.teacher``: its run folder or checkpoint, loaded by the engine
through :meth:`teacher_source`). On top of stage 1's terms, per image:

- labelled task: ``feature_weight`` x the MSE between the student's and the teacher's task
  feature (the decoder's token-attention output), mean over channels and pixels;
- unlabelled task: ``distill_weight`` x that MSE weighted per pixel by the teacher's token
  score (feature-level pseudo-supervision), plus a pseudo-label term, times the task's
  ``loss_weight`` and its pseudo weight (``pseudo_weights``; the code's: edge 0.05, else 1):
  class maps and binary maps take the teacher's hard label where its confidence exceeds the
  task's threshold (``Task.pseudo_label``) and the task's pixel loss there; bin and cluster
  heads weight ``|student - teacher|`` (mean over channels) by the teacher's confidence
  ``c = max softmax(sharpen x logits)`` where ``c`` exceeds the threshold. Each is a mean
  over all pixels of the image (unconfident pixels count as 0), as the code's.

Every term is a sum over images divided by the batch size, times the number of tasks
(``task_count_scale``, the code's ``/ local_bs * len(tasks)``). The supervised terms
(task loss + bin classification) are ``Losses.tasks`` (what a weighting combines); the
stage-2 terms are extras. Thresholds (``thresholds``, keyed by task name or kind) default to
the code's NYUv2 one-label values (segmentation 0.9, depth 0.85, normals 0.85) and its
PASCAL-Context values for the other kinds (human parts 0.85 is a segmentation task there:
set it by name; saliency 0.7, edge 0.99). Departures: ``docs/fidelity.md``, section "hitts".
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mtpsl.core.errors import ConfigError
from mtpsl.data.batch import Batch
from mtpsl.methods.base import METHODS, Losses, Method, labelled_sum
from mtpsl.models import ModelOutput
from mtpsl.tasks import TASKS, Task, task_kind

THRESHOLDS = {"segmentation": 0.9, "depth": 0.85, "normal": 0.85, "saliency": 0.7,
              "edge": 0.99}
"""Default pseudo-label thresholds by task kind (``loss_schemes.py`` 130-138); others 0.9."""
PSEUDO_WEIGHTS = {"edge": 0.05}
"""Default pseudo-label weights by task kind (``loss_schemes.py`` 256: ``beta``); others 1."""


class HiTTsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    stage: Literal[1, 2] = 1
    """1: labels only; 2: retrain with the stage-1 run as teacher."""
    teacher: str | None = None
    """Stage 2: the stage-1 run's folder or checkpoint file (required there, refused in 1)."""
    thresholds: dict[str, float] = {}
    """Pseudo-label confidence thresholds by task name or kind, over :data:`THRESHOLDS`."""
    pseudo_weights: dict[str, float] = {}
    """Pseudo-label term factors by task name or kind, over :data:`PSEUDO_WEIGHTS`."""
    cls_weight: float = Field(default=0.1, ge=0.0)
    """Weight of the bin/centre classification of depth and normal heads (the code's 0.1)."""
    sharpen: float = Field(default=5.0, gt=0.0)
    """Factor on a bin head's logits before the softmax that gives its confidence (5)."""
    feature_weight: float = Field(default=1.0, ge=0.0)
    """Stage 2: weight of the feature MSE on labelled tasks."""
    distill_weight: float = Field(default=1.0, ge=0.0)
    """Stage 2: weight of the score-weighted feature MSE on unlabelled tasks."""
    task_count_scale: bool = True
    """Multiply every term by the number of tasks, as the code; false: the plain sums."""


def _per_kind(tasks: Mapping[str, Task], given: Mapping[str, float], defaults: Mapping[str, float],
              fallback: float, key: str) -> dict[str, float]:
    """A value per task: by name, else by kind, else the default of its kind (or fallback)."""
    kinds = {name: task_kind(t) or "" for name, t in tasks.items()}
    for name, value in given.items():
        if name not in tasks and name not in TASKS.names():
            raise ConfigError(f"method.options.{key}.{name}: neither a task ({', '.join(tasks)})"
                              f" nor a task kind ({', '.join(TASKS.names())})")
        if not value >= 0.0:
            raise ConfigError(f"method.options.{key}.{name}: {value}; allowed: a number >= 0")
    return {name: given.get(name, given.get(kinds[name], defaults.get(kinds[name], fallback)))
            for name in tasks}


def _wide(x: Tensor) -> Tensor:
    """fp32 for half-precision maps (autocast); float64 kept."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def pixel_mean(x: Tensor) -> Tensor:
    """Mean over everything but the batch axis ``[B]``."""
    return x.flatten(1).mean(dim=1)


def nearest_code(book: Tensor, target: Tensor) -> Tensor:
    """Class of each pixel ``[B, H, W]``: the nearest bin (one channel: ``|d - c|``), or the
    most aligned centre (several: the largest dot product)."""
    book = book.to(target.dtype)
    if book.shape[1] == 1:
        return (target - book.view(1, -1, 1, 1)).abs().argmin(dim=1)
    return torch.einsum("bchw,kc->bkhw", target, book).argmax(dim=1)


def code_classification(logits: Tensor, book: Tensor, task: Task, target: Tensor) -> Tensor:
    """Per-image cross-entropy ``[B]`` of bin/centre logits against the label's class, mean
    over the label's valid pixels (0 without any)."""
    valid = task.valid(target)
    label = torch.where(valid, nearest_code(book, target), 0)
    ce = F.cross_entropy(_wide(logits), label, reduction="none")
    count = valid.flatten(1).sum(1).clamp(min=1)
    return torch.where(valid, ce, 0.0).flatten(1).sum(1) / count


@METHODS.register("hitts")
class HiTTs(Method):
    """HiTTs (ACM MM 2025): task-token network trained on the labels (stage 1), then
    retrained with stage 1 as teacher: confidence-thresholded pseudo-labels and token-scored
    feature distillation for the unlabelled tasks (stage 2). Options: :class:`HiTTsOptions`."""

    Options = HiTTsOptions
    options: HiTTsOptions

    def __init__(self, tasks: Mapping[str, Task], options: HiTTsOptions) -> None:
        super().__init__(tasks, options)
        if options.stage == 2 and not options.teacher:
            raise ConfigError("method.options.teacher: stage 2 needs the stage-1 run (its folder "
                              "or checkpoint file)")
        if options.stage == 1 and options.teacher:
            raise ConfigError("method.options.teacher: only stage 2 has a teacher (set "
                              "method.options.stage: 2, or remove the teacher)")
        self.thresholds = _per_kind(self.tasks, options.thresholds, THRESHOLDS, 0.9,
                                    "thresholds")
        self.pseudo_weights = _per_kind(self.tasks, options.pseudo_weights, PSEUDO_WEIGHTS, 1.0,
                                        "pseudo_weights")
        self.teacher_net: nn.Module | None = None

    def attach(self, model: nn.Module) -> None:
        """Stage 2: the teacher, a frozen copy of the model's architecture (any model: without
        the ``hitts`` model's features and ``codebook`` the terms that need them are absent)."""
        if self.options.stage == 2:  # the engine loads the stage-1 weights into it
            self.teacher_net = copy.deepcopy(model).requires_grad_(False)

    def teacher_source(self) -> tuple[str, nn.Module] | None:
        if self.teacher_net is None or self.options.teacher is None:
            return None
        return self.options.teacher, self.teacher_net

    def compute(self, model: nn.Module, batch: Batch) -> tuple[Losses, ModelOutput]:
        out = model(batch.image)
        scale = float(len(self.tasks)) if self.options.task_count_scale else 1.0
        tasks, cls_log = self.supervised(model, batch, out)
        losses = {name: scale * v for name, v in tasks.items()}
        logs = {"hitts_cls": scale * cls_log}
        extra: dict[str, Tensor] = {}
        if self.options.stage == 2:
            terms = self.teacher_terms(model, batch, out, self.teacher_outputs(batch.image))
            extra = {name: scale * v.sum() / len(batch) for name, v in terms.items()}
        return Losses(losses, extra, logs), out

    def supervised(self, model: nn.Module, batch: Batch, out: ModelOutput
                   ) -> tuple[dict[str, Tensor], Tensor]:
        """Each task's loss (+ bin classification) over its labelled images / B, and the
        classification part alone (for the logs)."""
        losses, cls_total = {}, _wide(next(iter(out.preds.values()))).new_zeros(())
        for name, task in self.tasks.items():
            target = batch.targets[name]
            per_image = task.loss(_wide(out.preds[name]), target)
            book = _codebook(model, name)
            logits = out.features.get(f"hitts/logits/{name}")
            if book is not None and logits is not None and self.options.cls_weight:
                cls = (self.options.cls_weight * task.loss_weight
                       * code_classification(logits, book, task, target))
                per_image = per_image + cls
                cls_total = cls_total + labelled_sum(cls, batch, name).detach()
            losses[name] = labelled_sum(per_image, batch, name)
        return losses, cls_total

    @torch.no_grad()
    def teacher_outputs(self, image: Tensor) -> ModelOutput:
        """The teacher's outputs in eval mode (its own statistics), without gradient."""
        if self.teacher_net is None:
            raise RuntimeError("hitts: attach(model) builds the teacher first")
        self.teacher_net.eval()
        out = self.teacher_net(image)
        return ModelOutput({k: _wide(v) for k, v in out.preds.items()},
                           {k: _wide(v) for k, v in out.features.items()})

    def teacher_terms(self, model: nn.Module, batch: Batch, out: ModelOutput,
                      teacher: ModelOutput) -> dict[str, Tensor]:
        """Stage 2's per-image terms ``[B]``: feature MSE (labelled tasks), score-weighted
        feature MSE and pseudo-labels (unlabelled tasks)."""
        o = self.options
        zero = _wide(next(iter(out.preds.values()))).new_zeros(len(batch))
        terms = {"hitts_feature": zero, "hitts_distill": zero, "hitts_pseudo": zero}
        for name, task in self.tasks.items():
            lab = batch.labelled_for(name).to(zero.device)
            feat = out.features.get(f"hitts/feature/{name}")
            feat_t = teacher.features.get(f"hitts/feature/{name}")
            if feat is not None and feat_t is not None:
                sq = (_wide(feat) - feat_t).pow(2)
                score = teacher.features[f"hitts/score/{name}"]
                terms["hitts_feature"] = terms["hitts_feature"] + torch.where(
                    lab, o.feature_weight * pixel_mean(sq), 0.0)
                terms["hitts_distill"] = terms["hitts_distill"] + torch.where(
                    lab, 0.0, o.distill_weight * pixel_mean(sq * score))
            pseudo = self.pseudo_label_loss(model, name, task, out, teacher)
            if pseudo is not None:
                weight = task.loss_weight * self.pseudo_weights[name]
                terms["hitts_pseudo"] = terms["hitts_pseudo"] + torch.where(
                    lab, 0.0, weight * pseudo)
        return terms

    def pseudo_label_loss(self, model: nn.Module, name: str, task: Task, out: ModelOutput,
                          teacher: ModelOutput) -> Tensor | None:
        """Per-image pseudo-label loss ``[B]`` (unweighted) from the teacher's outputs, mean
        over every pixel; None for a task without a confidence."""
        threshold = self.thresholds[name]
        pred = _wide(out.preds[name])
        logits_t = teacher.features.get(f"hitts/logits/{name}")
        if _codebook(model, name) is not None and logits_t is not None:
            confidence = (self.options.sharpen * logits_t).softmax(dim=1).amax(dim=1)
            weight = torch.where(confidence > threshold, confidence, 0.0)
            return pixel_mean((pred - teacher.preds[name]).abs().mean(dim=1) * weight)
        target = task.pseudo_label(task.as_map(teacher.preds[name]), threshold)
        if target is None:
            return None
        mask = task.valid(target)
        return pixel_mean(torch.where(mask, task.pixel_loss(pred, target), 0.0))


def _codebook(model: nn.Module, name: str) -> Tensor | None:
    """The model's bins / centres of a task's head (``model.codebook``), None without."""
    book = getattr(model, "codebook", None)
    return book(name) if callable(book) else None
