"""Pairwise cross-task mappings: ``direct_map`` and ``perceptual_map`` (paper 001, Sec. 3.2).

The two "alternative mapping strategies" of Li, Liu & Bilen (CVPR 2022), compared with their
joint-space mapping in Tables 1, 2 and 4. Following Zamir et al. (cross-task consistency), each
ordered task pair ``s -> t`` gets its own mapping network, a whole SegNet taking task ``s``'s
encoded prediction (:meth:`~mtpsl.tasks.Task.encode_pred`: Gumbel straight-through one-hot for
segmentation, per-image max-normalised depth, ``(n+1)/2`` normals) to task ``t``'s output
space (``t``'s head and activation). The T(T-1) mappings sit in ``self.mappings`` keyed
``"s->t"`` and are trained in the default optimiser group together with the multi-task network.
Both methods use one view (the supervised loss's) and one multi-task forward.

- ``direct_map``: for image i and each ordered pair with ``s`` unlabelled and ``t`` labelled
  on i, ``L_t(m_{s->t}(enc(yhat_s)), y_t)`` (the task's masked per-image loss; ``distance=cosine``:
  the paper's L_ct). Per image the sum over its pairs (``normalize=mean``: their mean), per
  batch the mean over images (images without pairs add 0), times ``weight``.
  Gradients reach the mapping and the multi-task network.
- ``perceptual_map``: "maps both the ground truth y^s and predicted labels yhat^s and minimizes
  their distance in task t's label space". On pairs where ``s`` is labelled on i (any t != s):
  ``P = d_t(m_{s->t}(enc(yhat_s)), m_{s->t}(enc_target(y_s)))`` with ``d_t`` =
  :meth:`~mtpsl.tasks.Task.distance`. Extra losses ``perceptual = weight * mean_i sum P`` and
  ``map_fit = mean_i sum F``.

Interpretation choices (the paper gives one sentence per method):

1. *P does not train the mapping.* The mapping's parameters are detached for the P term
   (``torch.func.functional_call`` with detached parameters) and the ground-truth branch runs
   without grad: a mapping trained by P alone could collapse to a constant, which makes P zero
   for every prediction. P trains only the multi-task network (through ``yhat_s``).
2. *The mappings of perceptual_map are trained by a fit term F.* The paper learns them "from
   prediction of one task to another task's ground truth", so F is direct_map's loss
   ``L_t(m_{s->t}(enc(yhat_s)), y_t)`` on every pair whose ``t`` is labelled on the image
   (whether or not ``s`` is also labelled: with full labels there would otherwise be nothing to
   fit), with the input prediction DETACHED, so F trains only the mappings. F is not scaled by
   ``weight``: it is the mappings' own objective and does not touch the multi-task network.
3. ``weight`` defaults to 1.0. The paper substitutes these terms for its consistency loss in
   Eq. 4, i.e. reuses its ``con_weight`` (2.0 NYUv2, 1.0 Cityscapes); presets set it.
4. *Segmentation sampling.* The Gumbel sample of ``enc(yhat_s)`` is drawn once per source task
   and step; every pair (and in perceptual_map both P and F) with that source reuses it.

Batching. For each ordered pair the images that need it are selected from ``batch.labelled``
(one host copy of the ``[B, T]`` mask per step) and the mapping runs once on that sub-batch; a
pair with no images is skipped. The mappings are plain SegNets, so in training mode their
BatchNorm normalises over that pair's sub-batch (with the paper's NYUv2 batch of 2 and one
label per image, mostly a single image: per-instance statistics, as in the reference's batch-1
mapping passes). Like any BatchNorm net in training mode, a sub-batch of one image needs a
bottleneck of more than one pixel (inputs of at least 32 x 64 pixels).

Departures from the papers and reference code, with the options and tests that pin them:
``docs/fidelity.md``, section "baselines of paper 001".
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn
from torch.func import functional_call

from mtpsl.data.batch import Batch
from mtpsl.methods.base import METHODS, Losses, Method, supervised_losses
from mtpsl.methods.terms import Distance, ImageTerms, Normalize, between, to_label
from mtpsl.models import HeadSpec, ModelOutput, build_model
from mtpsl.tasks import Task


class MapOptions(BaseModel):
    """Options of ``direct_map`` and ``perceptual_map``."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    weight: float = 1.0
    """Weight of the cross-task term (the paper reuses con_weight: 2.0 NYUv2, 1.0 Cityscapes)."""
    mapping_width: float = 1.0
    """Width multiplier of each mapping SegNet (1.0 = the full 25M-parameter SegNet)."""
    normalize: Normalize = "sum"
    """sum: an image's terms are added (the official XTC code's convention); mean: divided by
    their number, the 1/|U_n| of the paper's Eq. 2-4 (docs/fidelity.md)."""
    distance: Distance = "task"
    """task: the target task's loss (Direct-Map, the fit term) and prediction distance
    (Perceptual-Map); cosine: the paper's L_ct, 1 - cosine of the two flattened maps."""


def pair_key(source: str, target: str) -> str:
    """Key of the mapping ``source -> target`` in :attr:`PairwiseMappings.mappings`."""
    return f"{source}->{target}"


def encoded_channels(task: Task) -> int:
    """Channels of ``task.encode_pred`` applied to a prediction (the mapping's input)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # probing draws no RNG state
        probe = task.encode_pred(torch.zeros(1, task.out_channels, 1, 1))
    return probe.shape[1]


class PairwiseMappings(Method):
    """Shared machinery: one SegNet mapping per ordered task pair, run per selected sub-batch."""

    Options = MapOptions
    contract_options: ClassVar[Mapping[str, Any]] = {"mapping_width": 0.0625}  # not 25M each
    options: MapOptions

    def __init__(self, tasks: Mapping[str, Task], options: MapOptions) -> None:
        super().__init__(tasks, options)
        self.task_order = tuple(self.tasks)
        self.mappings = nn.ModuleDict(
            {
                pair_key(s, t): build_model(  # the paper's mappings are SegNets
                    "segnet",
                    heads={t: HeadSpec.of(task_t)},
                    width=options.mapping_width,
                    in_channels=encoded_channels(task_s),
                )
                for s, t, task_s, task_t in self._ordered_pairs()
            }
        )

    def _ordered_pairs(self) -> Iterator[tuple[str, str, Task, Task]]:
        for s, task_s in self.tasks.items():
            for t, task_t in self.tasks.items():
                if s != t:
                    yield s, t, task_s, task_t

    def pairs(self) -> Iterator[tuple[int, int, Task, Task, nn.Module]]:
        """``(s index, t index, task s, task t, mapping)`` for every ordered pair."""
        for s, t, task_s, task_t in self._ordered_pairs():
            yield (
                self.task_order.index(s),
                self.task_order.index(t),
                task_s,
                task_t,
                self.mappings[pair_key(s, t)],
            )

    def _supervised_step(
        self, model: nn.Module, batch: Batch
    ) -> tuple[ModelOutput, dict[str, Tensor], Tensor]:
        """One model forward, the supervised losses (Eq. 1) and the host-side label mask."""
        out = model(batch.image)
        return out, supervised_losses(self.tasks, batch, out.preds), self._columns(batch)

    def _columns(self, batch: Batch) -> Tensor:
        """The batch's ``[B, T]`` label mask on the host, columns in this method's task order."""
        if tuple(batch.task_names) == self.task_order:
            return batch.labelled.cpu()
        cols = [batch.task_names.index(n) for n in self.task_order]
        return batch.labelled[:, cols].cpu()

    @staticmethod
    def _select(mask: Tensor, device: torch.device) -> Tensor | None:
        """Indices of the selected images on ``device``; None when there are none."""
        if not bool(mask.any()):
            return None
        return mask.nonzero().squeeze(1).to(device, non_blocking=True)


@METHODS.register("direct_map")
class DirectMap(PairwiseMappings):
    """Direct-Map: ``L_t(m_{s->t}(enc(yhat_s)), y_t)`` for s unlabelled, t labelled on the image.

    ``weight`` defaults to 1.0; the paper reuses its con_weight (2.0 NYUv2 / 1.0 Cityscapes),
    which the presets set.
    """

    def compute(self, model: nn.Module, batch: Batch) -> tuple[Losses, ModelOutput]:
        out, losses, labelled = self._supervised_step(model, batch)
        preds, targets, device = out.preds, batch.targets, batch.image.device
        encoded: dict[str, Tensor] = {}
        o = self.options
        total = ImageTerms(len(batch), batch.image, o.normalize)
        for si, ti, task_s, task_t, mapping in self.pairs():
            idx = self._select(~labelled[:, si] & labelled[:, ti], device)
            if idx is None:
                continue
            if task_s.name not in encoded:
                encoded[task_s.name] = task_s.encode_pred(preds[task_s.name])
            mapped = mapping(encoded[task_s.name][idx]).preds[task_t.name]
            total.add(idx, to_label(o.distance, task_t, mapped, targets[task_t.name][idx]))
        extra = {"direct_map": o.weight * total.reduce() / len(batch)}
        return Losses(losses, extra), out


@METHODS.register("perceptual_map")
class PerceptualMap(PairwiseMappings):
    """Perceptual-Map: ``d_t(m_{s->t}(enc(yhat_s)), m_{s->t}(enc(y_s)))`` for s labelled.

    The mapping is frozen for this term and trained by a separate fit term on detached
    predictions (see the module docstring). ``weight`` scales the perceptual term only; the
    paper reuses its con_weight (2.0 NYUv2 / 1.0 Cityscapes), which the presets set.
    """

    def compute(self, model: nn.Module, batch: Batch) -> tuple[Losses, ModelOutput]:
        out, losses, labelled = self._supervised_step(model, batch)
        preds, targets, device = out.preds, batch.targets, batch.image.device
        encoded: dict[str, Tensor] = {}
        o = self.options
        perceptual = ImageTerms(len(batch), batch.image, o.normalize)
        fit = ImageTerms(len(batch), batch.image, o.normalize)
        for si, ti, task_s, task_t, mapping in self.pairs():
            s, t = task_s.name, task_t.name
            sel_p = self._select(labelled[:, si], device)
            sel_f = self._select(labelled[:, ti], device)
            if sel_p is None and sel_f is None:
                continue
            if s not in encoded:
                encoded[s] = task_s.encode_pred(preds[s])
            if sel_p is not None:
                # Frozen mapping: gradients reach the multi-task net only (no collapse).
                frozen = {k: v.detach() for k, v in mapping.named_parameters()}
                mapped = functional_call(mapping, frozen, (encoded[s][sel_p],)).preds[t]
                with torch.no_grad():
                    reference = mapping(task_s.encode_target(targets[s][sel_p])).preds[t]
                perceptual.add(sel_p, between(o.distance, task_t, mapped, reference))
            if sel_f is not None:
                # Fit the mapping on detached predictions: gradients reach the mapping only.
                mapped = mapping(encoded[s][sel_f].detach()).preds[t]
                fit.add(sel_f, to_label(o.distance, task_t, mapped, targets[t][sel_f]))
        extra = {
            "perceptual": o.weight * perceptual.reduce() / len(batch),
            "map_fit": fit.reduce() / len(batch),
        }
        return Losses(losses, extra), out
