"""XTC: cross-task consistency in learned joint pairwise task-spaces (paper 001, Eq. 4).

Li, Liu & Bilen, "Learning Multiple Dense Prediction Tasks from Partially Annotated Data",
CVPR 2022. For an image labelled for task t but not for task s, the prediction of s and the
label of t are mapped into the joint space of the pair (s, t) by one FiLM-conditioned network
and pulled together (cosine), while both mapped maps are regularised towards the image's
(gradient-stopped) encoder feature, which keeps the mapping from collapsing to a constant.

Per ordered pair (s, t) of image i, on the second view:
    L = (1 - cos(M_s, M_t)) + reg_weight * [(1 - cos(M_s, f)) + (1 - cos(M_t, f))]
with cosine over channels averaged over positions. An image's consistency is the sum over its
pairs; the batch term is con_weight * mean over images. Pairs: s unlabelled x t labelled; on a
fully labelled image every s != t (prediction of s against the label of t).

Two implementations share the parameters: ``consistency`` (batched over every (image, pair,
branch), used for training) and ``reference_consistency`` (per image, per pair, batch-1
mapping passes, as the reference runs it). Tests hold them equal in value and gradient.

Departures from the papers and reference code, with the options and tests that pin them:
``docs/fidelity.md``, section "xtc".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mtpsl.core.errors import ConfigError
from mtpsl.data.batch import Batch
from mtpsl.methods.base import METHODS, JointMaps, Losses, Method, OptimGroup, supervised_losses
from mtpsl.methods.joint_space import JointSpaceMapper, Mapper, pair_index
from mtpsl.methods.joint_space_resnet import mapper_for_model
from mtpsl.methods.terms import map_cosine_distance as _cos_distance
from mtpsl.models import ModelOutput, require_encoder_info
from mtpsl.models.segnet import scaled_filters
from mtpsl.tasks import Task


class JointSpaceOptions(BaseModel):
    """Options shared by every method on the joint pairwise task-space (xtc and alternatives)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    con_weight: float = Field(default=2.0, ge=0.0)
    """Weight of the consistency term: 2.0 for NYUv2, 1.0 for Cityscapes (paper 001)."""
    rampup_epochs: int = Field(default=0, ge=0)
    """Linear ramp-up: the weight is con_weight * min(1, (epoch + 1) / rampup_epochs)."""
    conditioned: bool = True
    """False is the "w/o cond" ablation of Table 6: one mapping for all pairs, no FiLM."""
    film_lr: float = Field(default=1e-3, gt=0.0)
    """FiLM's own Adam learning rate: 1e-3 for NYUv2, 1e-5 for Cityscapes."""
    film_step_size: int = Field(default=30, gt=0)
    film_gamma: float = Field(default=0.5, gt=0.0, le=1.0)
    width: float | None = Field(default=None, gt=0.0)
    """Mapping-network width; None follows the SegNet encoder's channels (1.0 for resnet18)."""
    mapper: Literal["segnet", "resnet18"] = "segnet"
    """Mapping network: the paper's SegNet-style one, or a ResNet-18-style one (any encoder:
    its output is projected and resized to the model's encoder feature)."""


class XTCOptions(JointSpaceOptions):
    reg_weight: float = Field(default=0.5, ge=0.0)
    """Weight of the regulariser towards the encoder feature."""
    regularize: bool = True
    """False is the "w/o reg" ablation of Table 6."""
    implementation: Literal["batched", "per_sample"] = "batched"
    """batched: all (image, pair, branch) mapping passes in one; per_sample: the reference's
    per-image, per-pair batch-1 passes (same loss; for benchmarks and checks)."""


@dataclass
class PairRows:
    """The (image, s, t) rows of a batch's consistency pairs, with their FiLM pair ids."""

    image: Tensor
    source: Tensor
    target: Tensor
    pair: Tensor

    def __len__(self) -> int:
        return self.image.shape[0]


def consistency_pairs(labelled: Tensor) -> PairRows:
    """Rows (i, s, t): s unlabelled and t labelled on image i; all s != t when fully labelled.

    Needs the labelled mask on the host once per step (the number of pairs sizes the batch).
    """
    mask = labelled.detach().to("cpu", torch.bool)
    n_tasks = mask.shape[1]
    full = mask.all(dim=1, keepdim=True)
    source_ok = ~mask | full  # [B, K]
    allowed = source_ok[:, :, None] & mask[:, None, :]  # [B, s, t]
    allowed &= ~torch.eye(n_tasks, dtype=torch.bool)
    image, source, target = allowed.nonzero(as_tuple=True)
    pair = source * (n_tasks - 1) + torch.where(target < source, target, target - 1)
    device = labelled.device
    return PairRows(image.to(device), source.to(device), target.to(device), pair.to(device))


def pair_loss(m_s: Tensor, m_t: Tensor, feature: Tensor, reg_weight: float) -> Tensor:
    loss = _cos_distance(m_s, m_t)
    if reg_weight:
        loss = loss + reg_weight * (_cos_distance(m_s, feature) + _cos_distance(m_t, feature))
    return loss


class XTCLoss(nn.Module):
    """The consistency term of Eq. 4 for any set of tasks (batched and reference forms)."""

    def __init__(self, tasks: Mapping[str, Task], mapper: Mapper, reg_weight: float):
        super().__init__()
        self.tasks = dict(tasks)
        self.names = tuple(tasks)
        self.mapper = mapper
        self.reg_weight = reg_weight

    def consistency(
        self,
        preds: Mapping[str, Tensor],
        targets: Mapping[str, Tensor],
        feature: Tensor,
        labelled: Tensor,
        encode_pred: Callable[[Task, Tensor], Tensor] | None = None,
    ) -> Tensor:
        """Per-image consistency [B], batched over all (image, pair, branch) mapping passes."""
        encode_pred = encode_pred or (lambda task, x: task.encode_pred(x))
        rows = consistency_pairs(labelled)
        per_image = feature.new_zeros(labelled.shape[0])
        if len(rows) == 0:
            return per_image
        m_s, m_t = self.map_rows(preds, targets, rows, rows, encode_pred)
        losses = pair_loss(m_s, m_t, feature.detach()[rows.image], self.reg_weight)
        return per_image.index_add(0, rows.image, losses.to(per_image.dtype))

    def map_rows(
        self,
        preds: Mapping[str, Tensor],
        targets: Mapping[str, Tensor],
        source_rows: PairRows,
        target_rows: PairRows,
        encode_pred: Callable[[Task, Tensor], Tensor],
    ) -> tuple[Tensor, Tensor]:
        """Joint-space maps of both branches in one batched mapping pass.

        ``m_s[r] = m^{s->st}(encode_pred(yhat^s(x_i)))`` for the (i, s, pair) of
        ``source_rows[r]`` and ``m_t[r] = m^{t->st}(encode_target(y_i^t))`` for the (i, t, pair)
        of ``target_rows[r]``; the two row sets may differ in length.
        """
        n_s, n_t = len(source_rows), len(target_rows)
        first = next(iter(preds.values()))
        width = self.mapper.inputs[self.names[0]]["conv"].out_channels  # type: ignore[index]
        h0 = first.new_empty(n_s + n_t, width, *first.shape[-2:])
        if n_s:
            h0 = self._embed_rows(h0, source_rows.source, source_rows.image, preds, encode_pred,
                                  offset=0)
        if n_t:
            h0 = self._embed_rows(h0, target_rows.target, target_rows.image, targets,
                                  lambda task, x: task.encode_target(x), offset=n_s)
        mapped = self.mapper.encode(h0, torch.cat([source_rows.pair, target_rows.pair]))
        return mapped[:n_s], mapped[n_s:]

    def _embed_rows(self, out, task_ids, images, maps, encode, offset: int) -> Tensor:
        # Input layers differ per task: run each on the rows that use it, then scatter.
        pieces, where = [], []
        for k, name in enumerate(self.names):
            sel = (task_ids == k).nonzero(as_tuple=True)[0]
            if sel.numel() == 0:
                continue
            x = encode(self.tasks[name], maps[name][images[sel]])
            pieces.append(self.mapper.embed(name, x))
            where.append(sel + offset)
        index = torch.cat(where)
        out = out.index_copy(0, index, torch.cat(pieces).to(out.dtype))
        return out

    def reference_consistency(
        self,
        preds: Mapping[str, Tensor],
        targets: Mapping[str, Tensor],
        feature: Tensor,
        labelled: Tensor,
        encode_pred: Callable[[Task, Tensor], Tensor] | None = None,
    ) -> Tensor:
        """The literal per-image, per-pair form with batch-1 mapping passes (test oracle)."""
        encode_pred = encode_pred or (lambda task, x: task.encode_pred(x))
        k = len(self.names)
        per_image = []
        for i in range(labelled.shape[0]):
            lab = [bool(v) for v in labelled[i]]
            total = feature.new_zeros(())
            for s in range(k):
                for t in range(k):
                    if s == t or not lab[t] or (lab[s] and not all(lab)):
                        continue
                    s_name, t_name = self.names[s], self.names[t]
                    pair = pair_index(s, t, k)
                    x_s = encode_pred(self.tasks[s_name], preds[s_name][i : i + 1])
                    x_t = self.tasks[t_name].encode_target(targets[t_name][i : i + 1])
                    m_s = self.mapper.reference_forward(s_name, x_s, pair)
                    m_t = self.mapper.reference_forward(t_name, x_t, pair)
                    total = total + pair_loss(m_s, m_t, feature[i : i + 1].detach(),
                                              self.reg_weight)[0]
            per_image.append(total)
        return torch.stack(per_image)


@METHODS.register("xtc")
class CrossTaskConsistency(Method):
    """MTPSL (Li, Liu & Bilen, CVPR 2022): cross-task consistency in learned joint pairwise
    task-spaces. Options: :class:`XTCOptions` (ablations: conditioned, regularize)."""

    n_views = 2
    Options: ClassVar[type[JointSpaceOptions]] = XTCOptions
    options: JointSpaceOptions  # XTCOptions for xtc itself; the alternatives narrow it
    label: ClassVar[str] = "xtc"
    """The registered name, for error messages (subclasses set theirs)."""

    def __init__(self, tasks: Mapping[str, Task], options: JointSpaceOptions) -> None:
        super().__init__(tasks, options)
        if len(tasks) < 2:
            raise ConfigError(
                f"method {self.label} needs at least two tasks (it relates task pairs)"
            )
        self.weight_now = options.con_weight if options.rampup_epochs == 0 else 0.0
        self.loss_fn: XTCLoss | None = None  # built by attach(): its channels follow the model

    def attach(self, model: nn.Module) -> None:
        """Create the mapping network to match the model's encoder feature."""
        info = require_encoder_info(model, self.label)
        channels = info.channels
        in_channels = {n: t.out_channels for n, t in self.tasks.items()}
        mapper: Mapper
        if self.options.mapper == "resnet18":
            mapper = mapper_for_model(model, in_channels, self.options.conditioned,
                                      self.options.width)
        elif self.options.width is None and 2 ** len(info.stages) != info.reduction:
            raise ConfigError(
                f"method.options.mapper: the segnet mapper mirrors a SegNet-style encoder of "
                f"halving stages; {type(model).__name__} needs mapper=resnet18"
            )
        else:
            filters = scaled_filters(self.options.width) if self.options.width else info.stages
            mapper = JointSpaceMapper(in_channels, self.options.conditioned, list(filters))
        if mapper.out_channels != channels:
            raise ConfigError(
                f"method.options.width: the mapping network gives {mapper.out_channels} "
                f"channels but the model's encoder feature has {channels}"
            )
        self.loss_fn = XTCLoss(self.tasks, mapper, self.regulariser_weight())
        self.loss_fn.to(next(model.parameters()).device)

    def joint_space(self, preds: Mapping[str, Tensor], targets: Mapping[str, Tensor],
                    source: str, target: str) -> JointMaps:
        """``m^{s->st}(y_hat^s)`` and ``m^{t->st}(y^t)``, the prediction encoded without
        sampling noise (a segmentation as the one-hot of its argmax)."""
        names = list(self.tasks)
        pid = pair_index(names.index(source), names.index(target), len(names))
        pred = preds[source]
        pairs = torch.full((len(pred),), pid, dtype=torch.long, device=pred.device)
        mapper = self.built.mapper
        m_s = mapper(source, self.tasks[source].encode_pred_eval(pred), pairs)
        m_t = mapper(target, self.tasks[target].encode_target(targets[target]), pairs)
        s, t = source, target
        return m_s, m_t, (f"m {s}->({s},{t})", f"m {t}->({s},{t})")

    @property
    def built(self) -> XTCLoss:
        """The loss with its mapping network (``attach`` builds it)."""
        if self.loss_fn is None:
            raise RuntimeError(f"method {self.label}: attach(model) builds the mapping network")
        return self.loss_fn

    def regulariser_weight(self) -> float:
        """The weight of the regulariser towards the encoder feature (0 = none)."""
        o = self.options
        return o.reg_weight if isinstance(o, XTCOptions) and o.regularize else 0.0

    def optimizer_groups(self, model: nn.Module) -> list[OptimGroup]:
        mapper = self.built.mapper
        groups = [OptimGroup("main", [*model.parameters(), *mapper.other_parameters()])]
        if mapper.film_parameters():
            o = self.options
            groups.append(OptimGroup("film", mapper.film_parameters(), o.film_lr,
                                     o.film_step_size, o.film_gamma))
        return groups

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        ramp = self.options.rampup_epochs
        factor = 1.0 if ramp == 0 else min(1.0, (epoch + 1) / ramp)
        self.weight_now = self.options.con_weight * factor

    def compute(self, model: nn.Module, batch: Batch) -> tuple[Losses, ModelOutput]:
        view0, view1 = batch.views
        b = len(batch)
        # One pass over both views: BatchNorm statistics are shared, as in the reference.
        out = model(torch.cat([view0.image, view1.image]))
        first = ModelOutput({k: v[:b] for k, v in out.preds.items()},
                            {k: v[:b] for k, v in out.features.items()})
        preds1 = {k: v[b:] for k, v in out.preds.items()}
        task_losses = supervised_losses(self.tasks, batch, first.preds, view=0)
        extra = self.joint_terms(preds1, view1.targets, out.features["encoder"][b:],
                                 batch.labelled)
        return Losses(task_losses, extra), first

    def joint_terms(
        self,
        preds: Mapping[str, Tensor],
        targets: Mapping[str, Tensor],
        feature: Tensor,
        labelled: Tensor,
    ) -> dict[str, Tensor]:
        """The extra loss terms on the second view (already weighted by ``weight_now``)."""
        o = self.options
        per_sample = isinstance(o, XTCOptions) and o.implementation == "per_sample"
        form = self.built.reference_consistency if per_sample else self.built.consistency
        per_image = form(preds, targets, feature, labelled)
        return {"xtc": self.weight_now * per_image.mean()}

