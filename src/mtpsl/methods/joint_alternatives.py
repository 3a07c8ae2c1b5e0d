"""``contrastive`` and ``discriminator``: the alternative losses of paper 001, Sec. 3.2.

Li, Liu & Bilen (CVPR 2022), "Alternative loss and regularization strategies": XTC's
cross-task consistency and its regulariser "can be replaced with another loss function only
that does not allow for learning of trivial mappings", using positive pairs (prediction of s
and label of t on the SAME image) and negative pairs (prediction of s on ANOTHER image j and
the label of t on image i). Table 1 reports both on Cityscapes ("Contrastive-Loss",
"Discriminator-Loss").

Everything but the loss is XTC's (:class:`~mtpsl.methods.xtc.CrossTaskConsistency`, which
both methods subclass): two views, one SegNet forward on ``cat[view0, view1]``, the supervised
loss on view0, the FiLM-conditioned :class:`~mtpsl.methods.joint_space.JointSpaceMapper` with
its own "film" optimiser group, the pair rules of
:func:`~mtpsl.methods.xtc.consistency_pairs` (s unlabelled x t labelled; every s != t on a
fully labelled image), ``con_weight`` (default 2.0) with its linear ramp-up, and the new term
on view1. There is no regulariser towards the encoder feature.

Notation: for a row (i, s, t) with pair code p = (s, t), ``m_s(j) = m^{s->st}(enc(yhat^s(x_j)))``
and ``m_t = m^{t->st}(enc(y_i^t))``; ``d`` is XTC's distance, 1 - cosine over channels
averaged over positions.

- ``contrastive``: ``L_row = mean_{j != i} relu(margin + d(m_s(i), m_t) - d(m_s(j), m_t))``,
  i.e. a hinge that "penalizes when the distance from the positive one is bigger than the
  negative one" (by less than ``margin``, default 0.5), against every other image j of the
  batch. The s-branch is mapped with pair p for every image of the batch (one batched mapping
  pass over all (image, pair) combinations that the rows need, plus the rows' t-branches), and
  the positive and the negatives of a row share those maps (one Gumbel sample per (j, p) for
  segmentation). A batch of one image has no negatives, so its rows contribute 0.
  Term ``contrastive = weight * mean_i sum_{rows of i} L_row``.
- ``discriminator``: a small CNN D on ``[m_s ; m_t]`` (2F channels at 1/32 resolution, F =
  ``mapper.out_channels``): Conv3x3(2F->F), LeakyReLU(0.2), Conv3x3(F->F/2), LeakyReLU(0.2),
  global average pool, Linear(F/2->1). Positive pair (m_s(i), m_t) is labelled 1, negative
  pair (m_s((i + 1) mod B), m_t), the next image of the batch, labelled 0. Per row the BCE
  with logits of the two pairs is summed; per image the sum over its rows; per batch the mean.
  Two terms from the same maps:

  * ``disc``: the BCE of D on DETACHED pairs; it trains D only (its own optimiser group
    "discriminator", Adam at ``disc_lr``, default 1e-4, StepLR from the config).
  * ``disc_gen = weight * BCE`` of D with its parameters detached
    (``torch.func.functional_call``); it trains the SegNet and the mapper, never D. The network
    minimises the same BCE as D (it is rewarded for making positive and negative pairs
    separable, i.e. for consistent predictions), not an adversarial inverse of it.

  *Alternating optimisation, simultaneous form.* The paper optimises D and the MTL network +
  mapping "alternatively". Here both updates come from ONE forward and one backward per
  iteration (the training loop steps every optimiser once): D is fitted to the features of
  the network before the network's update of that step, and the network's gradient uses D
  before D's update. A strictly sequential alternation would re-run D after its own step; the
  simultaneous form costs no second forward and the two terms do not share gradients.
  A batch of one image has no negative pair (the "next" image is itself): both terms are 0.

Departures from the papers and reference code, with the options and tests that pin them:
``docs/fidelity.md``, section "baselines of paper 001".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call

from mtpsl.methods.base import METHODS, OptimGroup
from mtpsl.methods.terms import Normalize, per_image_mean
from mtpsl.methods.xtc import (
    CrossTaskConsistency,
    JointSpaceOptions,
    PairRows,
    XTCLoss,
    consistency_pairs,
)
from mtpsl.tasks import Task

EncodePred = Callable[[Task, Tensor], Tensor]


class ContrastiveOptions(JointSpaceOptions):
    margin: float = Field(default=0.5, ge=0.0)
    """Hinge margin: a row costs nothing once every negative is ``margin`` farther than the
    positive (distances are in [0, 2])."""
    normalize: Normalize = "sum"
    """sum: an image's rows are added (the official XTC code's convention for its pairs);
    mean: divided by their number, the 1/|U_n| of the paper's Eq. 3-4 (docs/fidelity.md)."""


class DiscriminatorOptions(JointSpaceOptions):
    disc_lr: float = Field(default=1e-4, gt=0.0)
    """Adam learning rate of the discriminator's own optimiser group (StepLR from the config)."""


def _default_encode(task: Task, x: Tensor) -> Tensor:
    return task.encode_pred(x)


def _decode_pairs(pairs: Tensor, n_tasks: int) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`~mtpsl.methods.joint_space.pair_index`: pair codes -> (s, t)."""
    source = pairs // (n_tasks - 1)
    rest = pairs % (n_tasks - 1)
    return source, torch.where(rest < source, rest, rest + 1)


def contrastive_consistency(
    loss_fn: XTCLoss,
    preds: Mapping[str, Tensor],
    targets: Mapping[str, Tensor],
    labelled: Tensor,
    margin: float,
    encode_pred: EncodePred | None = None,
    normalize: Normalize = "sum",
) -> Tensor:
    """Per-image contrastive term ``[B]`` (unweighted): the sum of its rows' hinge losses, or
    their mean (``normalize="mean"``)."""
    encode_pred = encode_pred or _default_encode
    rows = consistency_pairs(labelled)
    n_images = labelled.shape[0]
    dtype = next(iter(preds.values())).dtype
    per_image = torch.zeros(n_images, dtype=dtype, device=labelled.device)
    if len(rows) == 0 or n_images < 2:  # no rows, or no other image to contrast with
        return per_image
    # The s-branch of every image j, for each pair code the rows use: index u * B + j.
    codes, which = torch.unique(rows.pair, return_inverse=True)
    source, target = _decode_pairs(codes, len(loss_fn.names))
    images = torch.arange(n_images, device=codes.device)
    every = PairRows(images.repeat(len(codes)), source.repeat_interleave(n_images),
                     target.repeat_interleave(n_images), codes.repeat_interleave(n_images))
    m_every, m_t = loss_fn.map_rows(preds, targets, every, rows, encode_pred)
    m_s = m_every.view(len(codes), n_images, *m_every.shape[1:])[which]  # [R, B, C, h, w]
    cos = F.cosine_similarity(m_s, m_t[:, None].expand_as(m_s), dim=2, eps=1e-8)
    dist = 1.0 - cos.flatten(2).mean(2)  # [R, B]: d(m_s(j), m_t) for every image j
    positive = dist.gather(1, rows.image[:, None])  # [R, 1]
    hinge = F.relu(margin + positive - dist)
    is_negative = images[None, :] != rows.image[:, None]
    row_loss = (hinge * is_negative).sum(1) / (n_images - 1)
    total = per_image.index_add(0, rows.image, row_loss.to(dtype))
    count = torch.bincount(rows.image, minlength=n_images).to(dtype)
    return per_image_mean(total, count, normalize)


class PairDiscriminator(nn.Module):
    """D([m_s ; m_t]) -> one logit per pair: conv-lrelu-conv-lrelu-GAP-linear."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = max(1, channels // 2)
        self.body = nn.Sequential(
            nn.Conv2d(2 * channels, channels, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(channels, half, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(half, 1),
        )

    def forward(self, m_s: Tensor, m_t: Tensor) -> Tensor:
        return self.body(torch.cat([m_s, m_t], dim=1)).squeeze(1)


def discriminator_terms(
    loss_fn: XTCLoss,
    disc: PairDiscriminator,
    preds: Mapping[str, Tensor],
    targets: Mapping[str, Tensor],
    labelled: Tensor,
    encode_pred: EncodePred | None = None,
) -> tuple[Tensor, Tensor]:
    """(D term, network term), both unweighted: the BCE on detached pairs (trains D only) and
    the same BCE through a frozen copy of D's parameters (trains the network and mapper)."""
    encode_pred = encode_pred or _default_encode
    rows = consistency_pairs(labelled)
    n_images = labelled.shape[0]
    dtype = next(iter(preds.values())).dtype
    zero = torch.zeros((), dtype=dtype, device=labelled.device)
    if len(rows) == 0 or n_images < 2:
        return zero, zero
    n = len(rows)
    other = (rows.image + 1) % n_images  # the negative's image: the next one in the batch
    sources = PairRows(torch.cat([rows.image, other]), rows.source.repeat(2),
                       rows.target.repeat(2), rows.pair.repeat(2))
    m_s, m_t = loss_fn.map_rows(preds, targets, sources, rows, encode_pred)
    m_t = m_t.repeat(2, 1, 1, 1)  # positive pairs first, then the negatives
    labels = torch.cat([m_s.new_ones(n), m_s.new_zeros(n)])

    def bce(logits: Tensor) -> Tensor:
        loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype),
                                                  reduction="none")
        per_image = torch.zeros(n_images, dtype=dtype, device=loss.device)
        return per_image.index_add(0, rows.image, (loss[:n] + loss[n:]).to(dtype)).mean()

    d_term = bce(disc(m_s.detach(), m_t.detach()))
    frozen = {k: v.detach() for k, v in disc.named_parameters()}
    g_term = bce(functional_call(disc, frozen, (m_s, m_t)))
    return d_term, g_term


class _JointSpaceAlternative(CrossTaskConsistency):
    """XTC's two views, mapper, pairs and FiLM group, without its regulariser."""

    def regulariser_weight(self) -> float:
        return 0.0


@METHODS.register("contrastive")
class ContrastiveLoss(_JointSpaceAlternative):
    """"Contrastive-Loss" of paper 001 (Table 1). Options: :class:`ContrastiveOptions`."""

    Options = ContrastiveOptions
    options: ContrastiveOptions
    label = "contrastive"

    def joint_terms(self, preds, targets, feature, labelled) -> dict[str, Tensor]:
        per_image = contrastive_consistency(self.built, preds, targets, labelled,
                                            self.options.margin,
                                            normalize=self.options.normalize)
        return {"contrastive": self.weight_now * per_image.mean()}


@METHODS.register("discriminator")
class DiscriminatorLoss(_JointSpaceAlternative):
    """"Discriminator-Loss" of paper 001 (Table 1). Options: :class:`DiscriminatorOptions`."""

    Options = DiscriminatorOptions
    options: DiscriminatorOptions
    label = "discriminator"

    def __init__(self, tasks: Mapping[str, Task], options: DiscriminatorOptions) -> None:
        super().__init__(tasks, options)
        self.disc: PairDiscriminator | None = None  # built by attach(), after the mapper

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        disc = PairDiscriminator(self.built.mapper.out_channels)
        self.disc = disc.to(next(model.parameters()).device)

    def _disc(self) -> PairDiscriminator:
        if self.disc is None:
            raise RuntimeError("method discriminator: attach(model) builds the discriminator")
        return self.disc

    def optimizer_groups(self, model: nn.Module) -> list[OptimGroup]:
        groups = super().optimizer_groups(model)
        groups.append(OptimGroup("discriminator", list(self._disc().parameters()),
                                 self.options.disc_lr))
        return groups

    def joint_terms(self, preds, targets, feature, labelled) -> dict[str, Tensor]:
        d_term, g_term = discriminator_terms(self.built, self._disc(), preds, targets, labelled)
        return {"disc": d_term, "disc_gen": self.weight_now * g_term}
