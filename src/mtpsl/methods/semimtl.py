"""SemiMTL (seed 002): one multi-task network trained across datasets that each label a subset
of the tasks, with adversarial signals where a task's label is missing.

Three methods share one implementation:

- ``jtl_stl``: the same losses with one independent network per task (the STL baseline).
- ``jtl``: joint task learning. The supervised losses only, on the domain-balanced batches the
  trainer draws from a ``cross_domain`` dataset (labels a source does not have are blanked by
  its availability mask). Depth uses the BerHu loss by default. ``supervised_mean`` reduces
  them over the whole batch (default) or over each source's images (the paper's per-dataset
  objective, twice the former with two balanced sources).
- ``semisd``: JTL + one 2-way discriminator per task, ground truth (class 0) vs prediction
  (class 1). The generator's adversarial loss pushes the predictions of the images NOT
  labelled for the task towards the ground-truth class.
- ``semimtl``: JTL + one domain-aware discriminator per task with ``1 + n_domains`` classes:
  ground truth (0) or prediction on domain d (``1 + d``). A domain "labels" a task in a batch
  when one of its images of that batch carries the task's label. The intra-domain loss pushes
  the predictions of the labelled domains to class 0; the inter-domain loss pushes the
  predictions of the other domains to a target set by ``mode``:

  * ``m1``: the labelled-domain prediction class(es) ``1 + d_l`` (spread uniformly when more
    than one domain labels the task),
  * ``m2`` (default, the paper's): the ground-truth class 0,
  * ``m3``: the joint of both: the cross-entropy against the average of the m1 and m2 target
    distributions (equal to the mean of the two cross-entropies).

  A task no domain labels in the batch has no m1 class: its inter-domain term is then 0 in m1
  and m3 (m2 still applies).

Discriminator input (per pixel, full resolution): segmentation as class probabilities
(``exp`` of the log-softmax head) for predictions and one-hot for labels; depth divided by the
image's largest absolute value; other tasks through ``Task.encode_pred`` / ``encode_target``.
Pixels where a label is invalid (ignore class, depth 0) are filled with the same image's
(detached) prediction before encoding, so "has holes" is not a cue that tells labels apart.

Losses. Every adversarial term is a per-pixel cross-entropy averaged over the pixels of each
image, then averaged over the images it applies to (0 when there are none). D's loss for a task
is the mean over its ground-truth inputs plus, per prediction class, the mean over the inputs
of that class (Eq. 9 of the paper). Terms in ``Losses.extra``: ``d_<task>`` (trains D only)
and ``adv_<task>`` = ``lambda_adv * L`` (semisd) or ``lambda_intra * L_intra +
lambda_inter * L_inter`` (semimtl), which trains the generator only.

*Simultaneous alternation.* As the ``discriminator`` baseline does, the D and G terms come from
one forward and one backward per iteration: D sees detached predictions, and the generator's
term runs D with its parameters' ``requires_grad`` switched off, so D's loss never reaches the
generator and the adversarial loss never reaches D. D therefore judges the generator of the
step before its own update, and vice versa; no second forward is needed.

Optimisers. The network uses ``optim.*`` of the config (the presets: SGD, momentum 0.9, poly
decay 0.9); the discriminators share one group "discriminator": Adam with betas (0.9, 0.99),
learning rate ``disc_lr`` and no weight decay, on the config's schedule.

Values the seed text does not give legibly (D's learning rate, the lambdas) default to those of
AdaptSegNet (Tsai et al., CVPR 2018, the paper's [56], whose D betas it quotes): ``disc_lr``
1e-4, lambdas 1e-3.

Departures from the papers and reference code, with the options and tests that pin them:
``docs/fidelity.md``, section "SemiMTL".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from mtpsl.core.errors import ConfigError
from mtpsl.data.batch import Batch
from mtpsl.methods.base import METHODS, Losses, Method, OptimGroup, frozen, labelled_sum
from mtpsl.models import ModelOutput
from mtpsl.models.base import scaled
from mtpsl.tasks import Task

DISC_CHANNELS = (64, 128, 256, 512)
DISC_BETAS = (0.9, 0.99)
MIN_DISC_INPUT = 32
"""Five stride-2 4x4 convolutions need at least 32 pixels per side (32 -> 1)."""


# ----------------------------------------------------------------------------- BerHu


def berhu_per_image(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Reverse Huber loss ``[B]``: the mean over each image's valid pixels (0 if none).

    ``x = pred - target``; ``|x|`` where ``|x| <= c``, else ``(x^2 + c^2) / (2c)``, with
    ``c = 0.2 * max|x|`` over the valid pixels of the whole batch (detached: a threshold, not a
    parameter). ``valid`` is bool ``[B,H,W]``; ``pred``/``target`` are ``[B,C,H,W]``.
    """
    adiff = (pred - target).abs()
    mask = valid.unsqueeze(1).expand_as(adiff)
    c = 0.2 * torch.where(mask, adiff, 0.0).detach().amax()
    c_safe = c.clamp_min(1e-12)
    quad = (adiff * adiff + c * c) / (2 * c_safe)
    pixel = torch.where(adiff <= c, adiff, quad).sum(dim=1)
    pixel = torch.where(valid, pixel, 0.0)
    count = valid.flatten(1).sum(1).clamp(min=1)
    return pixel.flatten(1).sum(1) / count


def task_losses(
    tasks: Mapping[str, Task], batch: Batch, preds: Mapping[str, Tensor], depth_loss: str,
    mean: str = "batch",
) -> dict[str, Tensor]:
    """Eq. 1 with BerHu for depth tasks when asked: the labelled images' losses summed and
    divided by the batch size (``mean="batch"``) or, per source, by that source's images in
    the batch, the sources' means summed (``"domain"``: each dataset's objective, Eq. 8)."""
    losses = {}
    for name, task in tasks.items():
        target = batch.targets[name]
        if depth_loss == "berhu" and task.continuous:
            per_image = berhu_per_image(preds[name], target, task.valid(target))
        else:
            per_image = task.loss(preds[name], target)
        if mean == "domain" and batch.domain is not None:
            losses[name] = per_domain_mean(per_image, batch, name)
        else:
            losses[name] = labelled_sum(per_image, batch, name)
    return losses


def per_domain_mean(per_image: Tensor, batch: Batch, task: str) -> Tensor:
    """``sum_d (1 / |B_d|) sum_{i in B_d, labelled} l_i`` over the sources ``d`` of the batch
    (a source without images in the batch adds nothing)."""
    assert batch.domain is not None
    labelled = batch.labelled_for(task).to(per_image.dtype)
    n = int(batch.domain.max()) + 1
    sums = per_image.new_zeros(n).index_add(0, batch.domain, per_image * labelled)
    counts = per_image.new_zeros(n).index_add(0, batch.domain, torch.ones_like(per_image))
    return (sums / counts.clamp(min=1)).sum()


# ----------------------------------------------------------------------------- discriminator


class PatchDiscriminator(nn.Module):
    """Five 4x4 stride-2 convolutions; spectral norm + LeakyReLU(0.2) on the first four; the
    class logits are upsampled (bilinear) back to the input size: ``[B, n_classes, H, W]``."""

    def __init__(self, in_channels: int, n_classes: int, width: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for base in DISC_CHANNELS:
            ch = scaled(base, width)
            layers += [
                spectral_norm(nn.Conv2d(prev, ch, 4, stride=2, padding=1)),
                nn.LeakyReLU(0.2),
            ]
            prev = ch
        layers.append(nn.Conv2d(prev, n_classes, 4, stride=2, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if min(h, w) < MIN_DISC_INPUT:
            raise ConfigError(
                f"the SemiMTL discriminator needs inputs of at least {MIN_DISC_INPUT}x"
                f"{MIN_DISC_INPUT} pixels, got {h}x{w} (use larger images)"
            )
        return F.interpolate(self.body(x), size=(h, w), mode="bilinear", align_corners=False)


def _fill_invalid(task: Task, target: Tensor, pred: Tensor) -> Tensor:
    """The label with its invalid pixels replaced by the prediction (detached), as a label."""
    valid = task.valid(target)
    guess = task.hard_label(pred.detach())
    return torch.where(valid if task.label_dims == 0 else valid.unsqueeze(1), target, guess)


def encode_pred(task: Task, pred: Tensor) -> Tensor:
    """A prediction as discriminator input (see the module docstring)."""
    return task.critic_input(pred)


def encode_target(task: Task, target: Tensor, pred: Tensor) -> Tensor:
    """A label as discriminator input, holes filled from ``pred`` (see the module docstring)."""
    return task.critic_label(_fill_invalid(task, target, pred))


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Per-image CE ``[N]`` of pixel logits ``[N,K,H,W]`` against class distributions
    ``[N,K]`` (the same for every pixel of an image), averaged over pixels."""
    logp = F.log_softmax(logits, dim=1)
    return -(logp * target[:, :, None, None]).sum(1).flatten(1).mean(1)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over ``mask`` (0, not NaN, when the mask is empty)."""
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp(min=1)


# ----------------------------------------------------------------------------- methods


class JTLOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    depth_loss: Literal["berhu", "l1"] = "berhu"
    """Supervised depth loss: BerHu (the paper's) or the task's own L1."""
    supervised_mean: Literal["batch", "domain"] = "batch"
    """Reduction of the supervised losses over a cross-domain batch: the whole batch (every
    mtpsl method's; with two sources each task's loss is half its sources' mean) or each
    source's own images, summed over sources (the paper's per-dataset objective)."""


class AdversarialOptions(JTLOptions):
    disc_lr: float = Field(default=1e-4, gt=0.0)
    """Adam learning rate of the discriminators (betas 0.9, 0.99)."""
    disc_width: float = Field(default=1.0, gt=0.0)
    """Multiplier of the discriminator channels 64, 128, 256, 512 (1.0 = the paper's)."""


class SemiSDOptions(AdversarialOptions):
    lambda_adv: float = Field(default=1e-3, ge=0.0)
    """Weight of the generator's adversarial loss on images unlabelled for a task."""


class SemiMTLOptions(AdversarialOptions):
    n_domains: int = Field(default=2, ge=1)
    """Source datasets: the discriminator classifies 1 + n_domains classes."""
    mode: Literal["m1", "m2", "m3"] = "m2"
    """Inter-domain target: m1 labelled-domain prediction, m2 ground truth, m3 both."""
    lambda_intra: float = Field(default=1e-3, ge=0.0)
    lambda_inter: float = Field(default=1e-3, ge=0.0)


@METHODS.register("jtl")
class JointTaskLearning(Method):
    """Supervised losses only, on domain-balanced batches (BerHu depth by default)."""

    Options = JTLOptions
    options: JTLOptions

    def compute(self, model: nn.Module, batch: Batch) -> tuple[Losses, ModelOutput]:
        out = model(batch.image)
        o = self.options
        return Losses(task_losses(self.tasks, batch, out.preds, o.depth_loss,
                                  o.supervised_mean)), out


@METHODS.register("jtl_stl")
class JTLSingleTask(JointTaskLearning):
    """Single-task networks with JTL's losses: the STL reference (Delta_m) of SemiMTL's
    tables, each task learning from the sources that label it, with the same depth loss."""

    per_task_networks = True


class _Adversarial(JointTaskLearning):
    """One discriminator per task in its own Adam group; subclasses set the classes/targets."""

    options: AdversarialOptions

    def n_classes(self) -> int:
        raise NotImplementedError

    def attach(self, model: nn.Module) -> None:
        device = next(model.parameters()).device
        self.discs = nn.ModuleDict(
            {
                name: PatchDiscriminator(
                    task.out_channels, self.n_classes(), self.options.disc_width
                )
                for name, task in self.tasks.items()
            }
        ).to(device)

    def optimizer_groups(self, model: nn.Module) -> list[OptimGroup]:
        d_params = {id(p) for p in self.discs.parameters()}
        own = [p for p in self.parameters() if id(p) not in d_params]
        return [
            OptimGroup("main", [*model.parameters(), *own]),
            OptimGroup(
                "discriminator",
                list(self.discs.parameters()),
                lr=self.options.disc_lr,
                optimizer="adam",
                betas=DISC_BETAS,
                weight_decay=0.0,
            ),
        ]

    def pred_classes(self, batch: Batch) -> Tensor:
        """long ``[B]``: the class of each image's prediction for D."""
        raise NotImplementedError

    def generator_targets(self, name: str, batch: Batch) -> tuple[Tensor, Tensor]:
        """(distributions ``[B,K]``, weights ``[B]``) of the generator's adversarial term."""
        raise NotImplementedError

    def compute(self, model: nn.Module, batch: Batch) -> tuple[Losses, ModelOutput]:
        out = model(batch.image)
        o = self.options
        losses = Losses(task_losses(self.tasks, batch, out.preds, o.depth_loss,
                                    o.supervised_mean))
        pred_cls = self.pred_classes(batch)
        for name, task in self.tasks.items():
            d_term, g_term = self.task_terms(name, task, out.preds[name], batch, pred_cls)
            losses.extra[f"d_{name}"] = d_term
            losses.extra[f"adv_{name}"] = g_term
        return losses, out

    def task_terms(
        self, name: str, task: Task, pred: Tensor, batch: Batch, pred_cls: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(D's loss, the generator's weighted adversarial loss) for one task."""
        disc = self.discs[name]
        labelled = batch.labelled_for(name)
        fake = encode_pred(task, pred)
        real = encode_target(task, batch.targets[name], pred)
        k = self.n_classes()
        # D: detached inputs, so its loss cannot reach the generator.
        logits = disc(torch.cat([real, fake.detach()]))
        classes = torch.cat([torch.zeros_like(pred_cls), pred_cls])  # ground truth is 0
        ce = soft_cross_entropy(logits, F.one_hot(classes, k).to(logits.dtype))
        n = len(batch)
        d_term = _masked_mean(ce[:n], labelled)
        for c in range(1, k):
            d_term = d_term + _masked_mean(ce[n:], pred_cls == c)
        # G: D's parameters frozen, so the adversarial loss cannot reach D.
        target, weight = self.generator_targets(name, batch)
        with frozen(disc):
            g_logits = disc(fake)
        per_image = soft_cross_entropy(g_logits, target.to(g_logits.dtype))
        return d_term, (per_image * weight).sum()


@METHODS.register("semisd")
class SemiSD(_Adversarial):
    """JTL + a 2-way discriminator per task (ground truth vs prediction)."""

    Options = SemiSDOptions
    options: SemiSDOptions

    def n_classes(self) -> int:
        return 2

    def pred_classes(self, batch: Batch) -> Tensor:
        return torch.ones(len(batch), dtype=torch.long, device=batch.labelled.device)

    def generator_targets(self, name: str, batch: Batch) -> tuple[Tensor, Tensor]:
        unlabelled = ~batch.labelled_for(name)
        target = F.one_hot(torch.zeros_like(unlabelled, dtype=torch.long), 2).float()
        count = unlabelled.sum().clamp(min=1)
        return target, self.options.lambda_adv * unlabelled.float() / count


def semimtl_targets(
    labelled: Tensor, domain: Tensor, n_domains: int, mode: str
) -> tuple[Tensor, Tensor, Tensor]:
    """For one task: (target distributions ``[B, 1+D]``, intra mask ``[B]``, inter mask ``[B]``).

    ``labelled`` bool ``[B]``, ``domain`` long ``[B]``. A domain labels the task when one of
    its images in the batch is labelled for it; its images get the intra term (target: class
    0), the other domains' images the inter term (target by ``mode``).
    """
    k = 1 + n_domains
    counts = torch.zeros(n_domains, dtype=torch.long, device=labelled.device)
    per_domain = counts.index_add(0, domain, labelled.long()) > 0
    intra = per_domain[domain]
    inter = ~intra
    gt = F.one_hot(torch.zeros_like(domain), k).float()
    lab = torch.cat([per_domain.new_zeros(1), per_domain]).float()
    has_lab = lab.sum() > 0
    lab = lab / lab.sum().clamp(min=1)
    inter_t = {"m1": lab, "m2": gt[0], "m3": 0.5 * (lab + gt[0])}[mode]
    target = torch.where(intra[:, None], gt, inter_t.expand(len(domain), k))
    if mode != "m2":
        inter = inter & has_lab
    return target, intra, inter


@METHODS.register("semimtl")
class SemiMTL(_Adversarial):
    """JTL + a domain-aware discriminator per task (ground truth vs prediction of domain d)."""

    Options = SemiMTLOptions
    options: SemiMTLOptions

    def n_classes(self) -> int:
        return 1 + self.options.n_domains

    def check_sources(self, n_sources: int) -> None:
        if self.options.n_domains != n_sources:
            raise ConfigError(f"method.options.n_domains: {self.options.n_domains} but "
                              f"dataset.options.domains lists {n_sources} sources")

    def _domain(self, batch: Batch) -> Tensor:
        if batch.domain is None:  # a single source: every image is domain 0
            return torch.zeros(len(batch), dtype=torch.long, device=batch.labelled.device)
        return batch.domain

    def pred_classes(self, batch: Batch) -> Tensor:
        return 1 + self._domain(batch)

    def generator_targets(self, name: str, batch: Batch) -> tuple[Tensor, Tensor]:
        o = self.options
        target, intra, inter = semimtl_targets(
            batch.labelled_for(name), self._domain(batch), o.n_domains, o.mode
        )
        weight = o.lambda_intra * intra.float() / intra.sum().clamp(
            min=1
        ) + o.lambda_inter * inter.float() / inter.sum().clamp(min=1)
        return target, weight
