"""``xtask``: the TaskTransferNet cross-task consistency framework (seed 003, ``xtask_mt``).

A multi-task net (usually ``model.name=xtask_net``) predicts segmentation and depth directly.
Two small U-Nets owned by this method, the *transfer nets*, map each direct prediction to the
other task: seg -> depth from the segmentation log-probabilities, depth -> seg from the depth
map. Each transferred prediction is compared with the other task's direct prediction, whose
value is DETACHED, so the consistency terms train the transfer nets and the decoder that fed
them, never the decoder that made the target. Per batch:

    direct seg     Ls  = masked NLL of the seg prediction (ignore = -1)
    direct depth   Ld  = depth_loss (l1 | mse | logl1 | smoothl1) over valid depth pixels
    transferred    Ltd = trans_depth_loss (l1 | ssim)(s2d(seg_pred), detach(depth_pred))
    transferred    Lts = trans_seg_loss (ce | kl)(d2s(depth_pred), argmax(detach(seg_pred)))
                         against label-smoothed one-hots: 1 - eps on the argmax class and
                         eps / (C - 1) on each other class
    Losses.tasks = {seg: (1 - alpha) * Ls + alpha * Ltd, depth: (1 - gamma) * Ld + gamma * Lts}

Each side holds the terms whose gradients reach that task's decoder (Ltd flows back through
the seg decoder, Lts through the depth decoder), as the seed pairs them under uncertainty
weighting and GradNorm; the strategy (``method.weighting``: uniform, uncertainty, gradnorm,
...) then combines the two sides; alpha goes with the transferred depth loss and gamma with the
transferred seg loss, as the reference pairs them at its HEAD and as its README says (an older
commit paired them the other way, which earlier versions of this docstring described; the
published setups use alpha = gamma, where both agree). Under uniform weighting the
total equals the seed's plain sum whichever way the terms are paired. ``Losses.extra`` stays
empty (its terms would be added outside the weighting); the four terms go to ``Losses.logs``
(logged per epoch as ``train/direct/<task>`` and ``train/transferred/<task>``) and the last
step's are kept, detached, in :attr:`TaskTransfer.last_terms`.

Seed flag -> mtpsl config: ``lp`` -> ``method.options.depth_loss``; ``tdep_loss`` ->
``trans_depth_loss``; ``tseg_loss`` -> ``trans_seg_loss``; ``label_smoothing``, ``batch_norm``,
``alpha``, ``gamma`` keep their names; ``wider_ttnet`` -> ``wider``; ``uncertainty_weights`` ->
``method.weighting=uncertainty``; ``gradnorm`` -> ``method.weighting=gradnorm``;
``enc_layers`` -> ``model.backbone.depth``; ``use_pretrain`` -> ``model.backbone.weights`` (a
local file); ``epochs``, ``batch_size``, ``scheduler_step_size``, ``scheduler_gamma`` ->
``train.*`` / ``optim.*``; height/width are those of the dataset on disk. The transfer nets
train in the main optimiser group with the model, as in the seed (one Adam).

Partial labels (our extension; the seed has none): each direct loss counts only the images
labelled for its task (a sum over those images divided by the batch size, as
:func:`~mtpsl.methods.base.supervised_losses`), while both transferred losses count every
image, since their targets are predictions. The transferred depth loss is restricted to the
pixels with a valid depth label on images labelled for depth (as the seed masks it) and uses
all pixels elsewhere (the reference masks nothing on NYUv2); the transferred seg loss
averages over all pixels, where the reference multiplies it by the seg label's valid mask and
still divides by every pixel (``trans_seg_mask=label`` does that). The GradNorm weight learning
rate defaults to 0.025 where the reference uses 1e-4 (``method.weighting_options.lr``). Every
row of this: docs/fidelity.md.

Masked SSIM (``trans_depth_loss=ssim``): both maps are multiplied by the mask, means,
variances and covariance come from 3x3 average pooling without padding, C1 = 0.01^2,
C2 = 0.03^2, and the per-window loss is ``clamp((1 - SSIM) / 2, 0, 1)``. The seed sums it over
all windows and divides by the number of valid pixels; we average it over the windows centred
on a valid pixel, so a full mask gives the plain mean over windows.

Differences from the seed, on purpose: its KL variant smooths with eps / (C - 2) and sums over
pixels (``KLDivLoss(reduction="batchmean")``); ours uses the same eps / (C - 1) targets as the
cross-entropy variant and averages over pixels, so ``kl`` equals ``ce`` minus the (constant)
entropy of the smoothed targets. Its direct seg loss averages over the batch's pixels; ours
over each image's pixels, then over images.

QUIRKS of the seed's evaluation that we do NOT reproduce: it picks checkpoints on the test
split, and its mIoU is a mean of per-image mIoUs. mtpsl reports the last epoch (a best epoch
only on a validation split carved from the training images) and the confusion-matrix mIoU
(``semantic/miou``), with ``pixel_acc``, ``depth/abs_err`` and ``depth/rel_err`` (= Abs Rel)
beside it (:mod:`mtpsl.metrics`); the seed's README numbers are not comparable with them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mtpsl.core.errors import ConfigError
from mtpsl.data.batch import Batch
from mtpsl.methods.base import METHODS, Losses, Method, labelled_sum
from mtpsl.models import ModelOutput
from mtpsl.tasks import Task, task_kind
from mtpsl.tasks.base import masked_pixel_mean

TRANSFER_WIDTHS: tuple[int, int, int] = (64, 128, 256)
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2
DEPTH_LOSSES = ("l1", "mse", "logl1", "smoothl1")


class XTaskOptions(BaseModel):
    """Every flag of the seed's table that is not a run-wide setting (see the module doc)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    depth_loss: Literal["l1", "mse", "logl1", "smoothl1"] = "l1"
    """Direct depth loss over valid pixels; logl1 = log(1 + |d|), smoothl1 with beta 1."""
    trans_depth_loss: Literal["l1", "ssim"] = "l1"
    """Loss between the depth transferred from seg and the (detached) direct depth."""
    trans_seg_loss: Literal["ce", "kl"] = "ce"
    """Loss between the seg transferred from depth and the argmax of the direct seg."""
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    """eps of the transferred seg loss's targets."""
    trans_seg_mask: Literal["none", "label"] = "none"
    """none: the transferred seg loss is the mean over every pixel; label: as the reference
    code, each pixel's loss is multiplied by the seg label's valid mask (on images with a
    seg label) and the mean still runs over every pixel (docs/fidelity.md)."""
    batch_norm: bool = False
    """BatchNorm after every conv of the transfer nets."""
    wider: bool = False
    """Double the transfer nets' widths (64, 128, 256 -> 128, 256, 512)."""
    alpha: float = Field(default=1e-4, ge=0.0, le=1.0)
    """Weight of the transferred depth loss on the seg side: 1e-4 NYUv2, 1e-2 Cityscapes."""
    gamma: float = Field(default=1e-4, ge=0.0, le=1.0)
    """Weight of the transferred seg loss on the depth side: 1e-4 NYUv2, 1e-2 Cityscapes."""
    transfer_width: float = Field(default=1.0, gt=0.0)
    """Extra multiplier of the transfer nets' widths (1.0 = the seed's; small for tests)."""


# --------------------------------------------------------------------------- losses


def depth_pixel_loss(kind: str, pred: Tensor, target: Tensor) -> Tensor:
    """Unreduced direct depth loss ``[B, H, W]`` (summed over channels)."""
    diff = pred - target
    if kind == "l1":
        per = diff.abs()
    elif kind == "mse":
        per = diff * diff
    elif kind == "logl1":
        per = torch.log1p(diff.abs())
    elif kind == "smoothl1":
        per = F.smooth_l1_loss(pred, target, reduction="none", beta=1.0)
    else:
        raise ValueError(f"depth loss {kind!r} unknown; allowed: {', '.join(DEPTH_LOSSES)}")
    return per.sum(dim=1)


def ssim_loss_map(pred: Tensor, target: Tensor) -> Tensor:
    """Per-window ``clamp((1 - SSIM) / 2, 0, 1)`` over 3x3 windows (no padding): ``[B, C,
    H-2, W-2]``."""
    mu_p = F.avg_pool2d(pred, 3, stride=1)
    mu_t = F.avg_pool2d(target, 3, stride=1)
    var_p = F.avg_pool2d(pred * pred, 3, stride=1) - mu_p * mu_p
    var_t = F.avg_pool2d(target * target, 3, stride=1) - mu_t * mu_t
    cov = F.avg_pool2d(pred * target, 3, stride=1) - mu_p * mu_t
    num = (2 * mu_p * mu_t + SSIM_C1) * (2 * cov + SSIM_C2)
    den = (mu_p * mu_p + mu_t * mu_t + SSIM_C1) * (var_p + var_t + SSIM_C2)
    return ((1 - num / den) / 2).clamp(0.0, 1.0)


def masked_ssim_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Per-image masked SSIM loss ``[B]``: masked maps, windows centred on valid pixels."""
    m = mask.unsqueeze(1).to(pred.dtype)
    loss = ssim_loss_map(pred * m, target * m).mean(dim=1)
    return masked_pixel_mean(loss, mask[:, 1:-1, 1:-1])


def smoothed_targets(labels: Tensor, num_classes: int, eps: float) -> Tensor:
    """``[B, C, H, W]`` distributions: 1 - eps on ``labels``, eps / (C - 1) elsewhere."""
    if num_classes == 1:
        return torch.ones(labels.shape[0], 1, *labels.shape[1:], device=labels.device)
    onehot = F.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()
    off = eps / (num_classes - 1)
    return onehot * (1.0 - eps - off) + off


def transferred_seg_loss(kind: str, logits: Tensor, labels: Tensor, eps: float,
                         pixel_weight: Tensor | None = None) -> Tensor:
    """Per-image ``[B]`` CE (or KL) of ``logits`` against smoothed ``labels``: the mean over
    every pixel of the per-pixel loss, times ``pixel_weight`` ``[B, H, W]`` where given."""
    log_p = F.log_softmax(logits, dim=1)
    q = smoothed_targets(labels, logits.shape[1], eps).to(log_p.dtype)
    per_pixel = -(q * log_p).sum(dim=1)
    if kind == "kl":
        per_pixel = per_pixel + torch.xlogy(q, q).sum(dim=1)
    elif kind != "ce":
        raise ValueError(f"transferred seg loss {kind!r} unknown; allowed: ce, kl")
    if pixel_weight is not None:
        per_pixel = per_pixel * pixel_weight.to(per_pixel.dtype)
    return per_pixel.flatten(1).mean(dim=1)


# ----------------------------------------------------------------------- transfer nets


def _conv_unit(in_channels: int, out_channels: int, batch_norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_channels))
    layers.append(nn.ReLU(inplace=True))
    return layers


def double_conv(in_channels: int, out_channels: int, batch_norm: bool) -> nn.Sequential:
    return nn.Sequential(
        *_conv_unit(in_channels, out_channels, batch_norm),
        *_conv_unit(out_channels, out_channels, batch_norm),
    )


class TransferNet(nn.Module):
    """U-Net from one task's prediction to another's: 3 down blocks (2 convs + max-pool),
    3 up blocks (bilinear x2 + 2 convs) reading the concatenated skip, a bias-free 1x1 conv.

    Up-sampling goes to the recorded size of the matching down level, so sides that are not
    multiples of 8 come back at their own resolution (each side must be at least 8).
    """

    def __init__(
        self, in_channels: int, out_channels: int, widths: Sequence[int], batch_norm: bool
    ) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.down = nn.ModuleList(
            [
                double_conv(in_channels, w1, batch_norm),
                double_conv(w1, w2, batch_norm),
                double_conv(w2, w3, batch_norm),
            ]
        )
        self.up = nn.ModuleList(
            [
                double_conv(w3, w2, batch_norm),
                double_conv(2 * w2, w1, batch_norm),
                double_conv(2 * w1, w1, batch_norm),
            ]
        )
        self.final = nn.Conv2d(w1, out_channels, kernel_size=1, bias=False)
        for m in self.modules():  # the seed's xavier init (BN stays at identity)
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        sizes, skips = [], []
        h = x
        for block in self.down:
            sizes.append(h.shape[-2:])
            h = F.max_pool2d(block(h), kernel_size=2, stride=2)
            skips.append(h)
        # skips: [H/2, H/4, H/8]; the deepest is the bottleneck, not a skip.
        for i, block in enumerate(self.up):
            if i > 0:
                h = torch.cat([h, skips[2 - i]], dim=1)
            h = F.interpolate(h, size=tuple(sizes[2 - i]), mode="bilinear", align_corners=True)
            h = block(h)
        return self.final(h)


def transfer_widths(options: XTaskOptions) -> list[int]:
    factor = options.transfer_width * (2 if options.wider else 1)
    return [max(1, round(w * factor)) for w in TRANSFER_WIDTHS]


# ---------------------------------------------------------------------------- method


def seg_and_depth(tasks: Mapping[str, Task], method: str) -> tuple[str, str]:
    """Names of the one segmentation (class-map) and the one depth (continuous) task, or a
    ConfigError."""
    segs = [n for n, t in tasks.items() if t.label_dims == 0]
    depths = [n for n, t in tasks.items() if t.continuous]
    if len(tasks) != 2 or len(segs) != 1 or len(depths) != 1:
        listed = ", ".join(f"{n} ({task_kind(t) or type(t).__name__})" for n, t in tasks.items())
        raise ConfigError(
            f"method.name: {method} needs exactly one segmentation and one depth task; the "
            f"dataset gives {listed}; choose them with dataset.tasks, e.g. [semantic, depth]"
        )
    return segs[0], depths[0]


@METHODS.register("xtask")
class TaskTransfer(Method):
    """Direct + transferred losses of the TaskTransferNet framework (see the module doc)."""

    Options = XTaskOptions
    options: XTaskOptions

    def __init__(self, tasks: Mapping[str, Task], options: XTaskOptions) -> None:
        super().__init__(tasks, options)
        self.seg, self.depth = seg_and_depth(self.tasks, "xtask")
        seg_ch = self.tasks[self.seg].out_channels
        depth_ch = self.tasks[self.depth].out_channels
        widths = transfer_widths(options)
        self.seg_to_depth = TransferNet(seg_ch, depth_ch, widths, options.batch_norm)
        self.depth_to_seg = TransferNet(depth_ch, seg_ch, widths, options.batch_norm)
        self.last_terms: dict[str, Tensor] = {}
        """Detached direct and transferred terms of the last :meth:`compute`."""

    def compute(self, model: nn.Module, batch: Batch) -> tuple[Losses, ModelOutput]:
        out = model(batch.image)
        terms = self.terms(out.preds, batch)
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        o = self.options
        s, d = self.seg, self.depth
        tasks = {
            s: (1 - o.alpha) * terms[f"direct/{s}"] + o.alpha * terms[f"transferred/{d}"],
            d: (1 - o.gamma) * terms[f"direct/{d}"] + o.gamma * terms[f"transferred/{s}"],
        }
        return Losses(tasks, logs=self.last_terms), out

    def terms(self, preds: Mapping[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """The four scalar terms: ``direct/<task>`` and ``transferred/<task>`` (the
        transferred prediction OF that task, made from the other task's prediction)."""
        return {**self.direct_terms(preds, batch), **self.transferred_terms(preds, batch)}

    def direct_terms(self, preds: Mapping[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """Supervised losses, each summed over the images labelled for its task / batch size."""
        s, d = self.seg, self.depth
        depth_task, targets = self.tasks[d], batch.targets
        per_image = {s: self.tasks[s].loss(preds[s], targets[s])}
        per_pixel = depth_pixel_loss(self.options.depth_loss, preds[d], targets[d])
        # The task's fixed loss factor, as Task.loss applies it to the seg term.
        weight = depth_task.loss_weight
        per_image[d] = masked_pixel_mean(per_pixel, depth_task.valid(targets[d])) * weight
        return {f"direct/{t}": labelled_sum(loss, batch, t) for t, loss in per_image.items()}

    def transferred_terms(self, preds: Mapping[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """Transferred predictions against the detached direct ones, over every image."""
        s, d = self.seg, self.depth
        seg_pred, depth_pred = preds[s], preds[d]
        # fp32 losses even when the nets run under autocast.
        from_seg = self.seg_to_depth(F.log_softmax(seg_pred, dim=1)).float()
        from_depth = self.depth_to_seg(depth_pred).float()
        # Valid depth pixels where the image has a depth label (as the seed), else all pixels.
        valid = self.tasks[d].valid(batch.targets[d])
        mask = torch.where(batch.labelled_for(d)[:, None, None], valid, True)
        depth_target = depth_pred.detach().float()
        if self.options.trans_depth_loss == "ssim":
            t_depth = masked_ssim_loss(from_seg, depth_target, mask)
        else:
            t_depth = masked_pixel_mean((from_seg - depth_target).abs().sum(1), mask)
        labels = seg_pred.detach().argmax(dim=1)
        o = self.options
        weight = None
        if o.trans_seg_mask == "label":
            valid = self.tasks[s].valid(batch.targets[s])
            weight = torch.where(batch.labelled_for(s)[:, None, None], valid, True)
        t_seg = transferred_seg_loss(o.trans_seg_loss, from_depth, labels, o.label_smoothing,
                                     weight)
        return {f"transferred/{d}": t_depth.mean(), f"transferred/{s}": t_seg.mean()}
