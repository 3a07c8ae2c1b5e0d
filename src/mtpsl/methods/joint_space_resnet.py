"""A ResNet-18-style conditional joint pairwise task-space mapping network (``mapper: resnet18``).

Paper 001 uses a ResNet-18 mapping network with task-specific input layers for PASCAL-Context
(ResNet-18 + ASPP model). This module is the drop-in alternative to
:class:`~mtpsl.methods.joint_space.JointSpaceMapper`: the same interface (``inputs``, ``embed``,
``encode``, ``forward``, ``reference_forward``, ``film_parameters``, ``other_parameters``,
``out_channels``), so :class:`~mtpsl.methods.xtc.XTCLoss` runs either unchanged.

Layout (widths ``64, 128, 256, 512`` times ``width``):

- per task: Conv3x3 (C_t -> w0, stride 1) -> norm -> ReLU (the "one conv per task"; it keeps
  the input size because the batched loss embeds every row into one full-resolution buffer);
- shared stem: Conv3x3 stride 2 -> norm -> FiLM -> ReLU, MaxPool 3x3 stride 2 (ResNet's
  /4 stem; a 3x3 conv stands in for the 7x7 to keep the per-row cost down);
- four stages of two BasicBlocks (strides 1, 2, 2, 2; the last strides become dilation for
  ``output_stride`` 16 / 8, as the dilated model encoders do); every normalisation in a block,
  the shortcut's included, is followed by FiLM;
- a final 1x1 conv when the last width differs from the model's encoder channels, then the
  output is resized to the model's encoder feature size: adaptive average pooling when the
  map is larger in both sides, bilinear interpolation otherwise. With ``output_stride`` equal to
  a ResNet model's, both round up alike and no resizing happens; a SegNet/MTAN encoder floors,
  so odd sizes lose (at most) the last row/column there.

Normalisation is per sample (:class:`~mtpsl.methods.joint_space.SampleNorm`) and FiLM is the
per-pair lookup table of the SegNet mapper, K tasks giving K(K-1) ordered pairs. Per-sample
statistics need more than one position in the last stage: an input side must exceed
``output_stride`` (e.g. 32x64 at OS 32; 32x32 fails, as batch-1 BatchNorm would).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtpsl.methods.joint_space import Mapper, NormFiLM, SampleNorm, init_conv_only
from mtpsl.models import require_encoder_info
from mtpsl.models.base import scaled

BASE_WIDTHS: tuple[int, ...] = (64, 128, 256, 512)
SizeFn = Callable[[int, int], tuple[int, int]]


def _conv3x3(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride, padding=dilation, dilation=dilation, bias=False)


class FiLMBasicBlock(nn.Module):
    """ResNet BasicBlock whose every normalisation is per-sample and FiLM-conditioned."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        stride: int,
        dilations: tuple[int, int],
        n_pairs: int | None,
    ) -> None:
        super().__init__()
        self.a = NormFiLM(_conv3x3(c_in, c_out, stride, dilations[0]), n_pairs)
        self.b = NormFiLM(_conv3x3(c_out, c_out, 1, dilations[1]), n_pairs)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = NormFiLM(nn.Conv2d(c_in, c_out, 1, stride, bias=False), n_pairs)

    def forward(self, x: Tensor, pairs: Tensor, ref: bool = False) -> Tensor:
        h = self.b(F.relu(self.a(x, pairs, ref)), pairs, ref)
        skip = x if self.shortcut is None else self.shortcut(x, pairs, ref)
        return F.relu(h + skip)


def stage_plan(output_stride: int) -> list[tuple[int, tuple[int, int], int]]:
    """(stride, (first-conv dilation, later dilation), later-block dilation) per stage.

    Same rule as the dilated trunk: a removed stride turns into dilation 2 (OS16: stage 4;
    OS8: stages 3 and 4 with 2 and 4), the stage's first conv keeps the previous dilation.
    """
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    rates = {32: (1, 1), 16: (1, 2), 8: (2, 4)}[output_stride]
    plan = [(1, (1, 1), 1), (2, (1, 1), 1)]
    previous = 1
    for rate in rates:
        stride = 2 if rate == 1 else 1
        plan.append((stride, (previous, rate), rate))
        previous = rate
    return plan


class ResNetJointSpaceMapper(Mapper):
    """ResNet-18-style pair-conditioned mapping network; see the module docstring.

    Args:
        in_channels: task name -> channels of its encoded input.
        out_channels: channels of the model's encoder feature (a 1x1 conv projects if needed).
        conditioned: FiLM on the ordered pair; False = one mapping for every pair.
        width: multiplier of the ResNet-18 widths.
        output_stride: 8, 16 or 32, the reduction before the final resize.
        feature_size: (H, W) of the input -> (h, w) of the model's encoder feature; None keeps
            the network's own output size.
    """

    def __init__(
        self,
        in_channels: Mapping[str, int],
        out_channels: int,
        conditioned: bool = True,
        width: float = 1.0,
        output_stride: int = 32,
        feature_size: SizeFn | None = None,
    ) -> None:
        super().__init__()
        self.task_names = tuple(in_channels)
        k = len(self.task_names)
        self.n_pairs = k * (k - 1)
        n_pairs = self.n_pairs if conditioned else None
        w = [scaled(c, width) for c in BASE_WIDTHS]
        self.inputs = nn.ModuleDict(
            {
                name: nn.ModuleDict(
                    {"conv": nn.Conv2d(c, w[0], 3, padding=1), "norm": SampleNorm(w[0])}
                )
                for name, c in in_channels.items()
            }
        )
        self.stem = NormFiLM(_conv3x3(w[0], w[0], stride=2), n_pairs)
        blocks, c_in = [], w[0]
        for (stride, dilations, rate), c in zip(stage_plan(output_stride), w, strict=True):
            blocks.append(FiLMBasicBlock(c_in, c, stride, dilations, n_pairs))
            blocks.append(FiLMBasicBlock(c, c, 1, (rate, rate), n_pairs))
            c_in = c
        self.blocks = nn.ModuleList(blocks)
        self.project = nn.Conv2d(c_in, out_channels, 1) if c_in != out_channels else None
        self.out_channels = out_channels
        self.feature_size = feature_size
        self.apply(init_conv_only)

    def encode(self, h: Tensor, pairs: Tensor, batch1_reference: bool = False) -> Tensor:
        """Shared conditioned ResNet: [N, w0, H, W] -> [N, out_channels, *feature_size(H, W)]."""
        size = h.shape[-2:]
        h = F.relu(self.stem(h, pairs, batch1_reference))
        h = F.max_pool2d(h, 3, 2, 1)
        for block in self.blocks:
            h = block(h, pairs, batch1_reference)
        if self.project is not None:
            h = self.project(h)
        return self.resize(h, size)

    def resize(self, h: Tensor, input_size: torch.Size) -> Tensor:
        """Match the model's encoder feature size (see the module docstring)."""
        if self.feature_size is None:
            return h
        th, tw = self.feature_size(int(input_size[0]), int(input_size[1]))
        target = (int(th), int(tw))
        if tuple(h.shape[-2:]) == target:
            return h
        if h.shape[-2] >= target[0] and h.shape[-1] >= target[1]:
            return F.adaptive_avg_pool2d(h, target)
        return F.interpolate(h, size=target, mode="bilinear", align_corners=False)


def mapper_for_model(
    model: nn.Module, in_channels: Mapping[str, int], conditioned: bool, width: float | None
) -> ResNetJointSpaceMapper:
    """A ResNet mapper whose output matches the model's encoder feature (its ``encoder_info``):
    the same channels, the output stride of its reduction (8/16/32; else 32) and its size
    rule."""
    info = require_encoder_info(model, "xtc")
    reduction = info.reduction
    return ResNetJointSpaceMapper(
        in_channels,
        info.channels,
        conditioned,
        width or 1.0,
        reduction if reduction in (8, 16, 32) else 32,
        info.size,
    )
