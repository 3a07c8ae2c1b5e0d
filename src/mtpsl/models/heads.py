"""Dense prediction heads for encoders with one output feature map (the dilated ResNets).

Every head maps the encoder's last feature ``[B, C_in, h, w]`` to ``[B, C_out, h', w']`` logits
(``h' >= h``); the model resizes them to the input size and applies the task activation, so a
head never needs to know which task it serves.

- ``psp``: pyramid pooling (PSPNet, Zhao et al. 2017): average pooling into 1, 2, 3 and 6 bins,
  a 1x1 conv-BN-ReLU per bin, upsampled and concatenated with the input, then a 3x3
  conv-BN-ReLU, dropout 0.1 and a 1x1 classifier. SemiMTL's segmentation decoder.
- ``aspp``: torchvision's DeepLab v3 ASPP (1x1 branch, three atrous 3x3 branches, image
  pooling, 1x1 projection with dropout 0.5) followed directly by a 1x1 classifier.
- ``deeplab``: the full DeepLab v3 head: ASPP, a 3x3 conv-BN-ReLU, then the 1x1 classifier.
- ``conv``: conv + upsampling decoder for dense regression (SemiMTL's depth generator): a 3x3
  conv-BN-ReLU, then one (bilinear x2, 3x3 conv-BN-ReLU halving the channels) stage per factor
  of two of the encoder's output stride, then a 1x1 conv; its logits are at input resolution.

``width`` scales every hidden channel count (256 for ASPP/conv, 512 for the PSP bottleneck).

:class:`FPNNeck` turns a multi-scale encoder's maps into the one map these heads take.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtpsl.models.base import scaled

HEAD_KINDS: tuple[str, ...] = ("psp", "aspp", "deeplab", "conv")
PSP_BINS: tuple[int, ...] = (1, 2, 3, 6)
#: DeepLab v3 atrous rates per output stride; OS 32 halves the OS-16 rates (our choice: the
#: paper only defines 8 and 16, and rates larger than the map are pure padding).
ASPP_RATES: dict[int, tuple[int, int, int]] = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}
FPN_CHANNELS = 128
"""Width of the FPN neck's maps at ``width`` 1 (Panoptic FPN's semantic branch uses 128)."""


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3) -> nn.Sequential:
    """Bias-free conv (the BN supplies the shift) + BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class PSPHead(nn.Module):
    """Pyramid pooling module + classifier."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        width: float = 1.0,
        bins: Sequence[int] = PSP_BINS,
    ) -> None:
        super().__init__()
        branch = scaled(in_channels // len(bins), width)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), conv_bn_relu(in_channels, branch, 1))
            for b in bins
        )
        mid = scaled(512, width)
        self.bottleneck = conv_bn_relu(in_channels + branch * len(bins), mid)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(mid, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [
            F.interpolate(stage(x), size=size, mode="bilinear", align_corners=False)
            for stage in self.stages
        ]
        h = self.bottleneck(torch.cat([x, *pooled], dim=1))
        return self.classifier(self.dropout(h))


class ASPPHead(nn.Sequential):
    """torchvision ASPP + 1x1 classifier; ``refine`` adds DeepLab v3's 3x3 conv-BN-ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rates: Sequence[int],
        width: float = 1.0,
        refine: bool = False,
    ) -> None:
        mid = scaled(256, width)
        from torchvision.models.segmentation.deeplabv3 import ASPP  # lazy: see encoders/resnet

        layers: list[nn.Module] = [ASPP(in_channels, list(rates), mid)]
        if refine:
            layers.append(conv_bn_relu(mid, mid))
        layers.append(nn.Conv2d(mid, out_channels, 1))
        super().__init__(*layers)


class ConvUpDecoder(nn.Module):
    """3x3 conv-BN-ReLU, then log2(output_stride) x (bilinear x2, conv-BN-ReLU), 1x1 conv."""

    def __init__(
        self, in_channels: int, out_channels: int, output_stride: int, width: float = 1.0
    ) -> None:
        super().__init__()
        c = scaled(256, width)
        self.entry = conv_bn_relu(in_channels, c)
        stages = []
        for _ in range(round(math.log2(output_stride))):
            stages.append(conv_bn_relu(c, max(1, c // 2)))
            c = max(1, c // 2)
        self.stages = nn.ModuleList(stages)
        self.out = nn.Conv2d(c, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.entry(x)
        for stage in self.stages:
            h = stage(F.interpolate(h, scale_factor=2.0, mode="bilinear", align_corners=False))
        return self.out(h)


def build_head(
    kind: str,
    in_channels: int,
    out_channels: int,
    output_stride: int,
    width: float = 1.0,
    aspp_rates: Sequence[int] | None = None,
    psp_bins: Sequence[int] = PSP_BINS,
) -> nn.Module:
    """The head ``kind`` (one of :data:`HEAD_KINDS`) for an encoder of this output stride."""
    nearest = min(ASPP_RATES, key=lambda r: (abs(math.log2(r / output_stride)), r))
    rates = tuple(aspp_rates) if aspp_rates else ASPP_RATES[nearest]
    if kind == "psp":
        return PSPHead(in_channels, out_channels, width, psp_bins)
    if kind in ("aspp", "deeplab"):
        return ASPPHead(in_channels, out_channels, rates, width, refine=kind == "deeplab")
    if kind == "conv":
        return ConvUpDecoder(in_channels, out_channels, output_stride, width)
    raise ValueError(f"unknown head {kind!r}; allowed: {', '.join(HEAD_KINDS)}")


class FPNNeck(nn.Module):
    """Feature pyramid (Lin et al., CVPR 2017) fused into one map at the finest level.

    A 1x1 lateral conv brings every encoder map to ``out_channels``; a top-down pass adds each
    coarser level, upsampled bilinearly, to the next finer one; a 3x3 conv-BN-ReLU smooths
    each level; the levels are upsampled to the finest and summed (Panoptic FPN's semantic
    branch without its per-level upsampling stacks). Output: ``[B, out_channels, h0, w0]`` at
    the stride of the encoder's first map.
    """

    def __init__(self, channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in channels)
        self.smooth = nn.ModuleList(conv_bn_relu(out_channels, out_channels) for _ in channels)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        levels = [conv(m) for conv, m in zip(self.lateral, maps, strict=True)]
        for i in range(len(levels) - 2, -1, -1):
            levels[i] = levels[i] + _resize(levels[i + 1], levels[i].shape[-2:])
        smoothed = [conv(level) for conv, level in zip(self.smooth, levels, strict=True)]
        size = smoothed[0].shape[-2:]
        fused = smoothed[0]
        for level in smoothed[1:]:
            fused = fused + _resize(level, size)
        return fused


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
