"""SegNet "split" multi-task network, as in MTAN (Liu et al., CVPR 2019) and MTPSL
(Li, Liu & Bilen, CVPR 2022).

A shared VGG-style encoder/decoder with max-unpooling, and one light head per task. Layer
layout, initialisation and head shape follow the reference code so that parameter counts and
results are comparable with the published numbers (25,055,188 parameters at width 1 with
13/1/3-channel heads in the reference, which also holds 3 uncertainty log-sigmas that belong to
a loss weighting scheme rather than to the network; this module has 25,055,185).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from mtpsl.models.base import (
    MODELS,
    FeatureInfo,
    HeadSpec,
    ModelOutput,
    MultiTaskModel,
    floor_size,
    scaled,
)

BASE_FILTERS: tuple[int, ...] = (64, 128, 256, 512, 512)
# Extra conv_bn_relu layers after the first one at each level (levels 0..4), as in MTAN.
EXTRA_CONVS: tuple[int, ...] = (1, 1, 2, 2, 2)


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv (with bias, as in the reference) + BatchNorm + ReLU, the SegNet building block."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _repeat_block(channels: int, n: int) -> nn.Module:
    """``n`` same-width conv_bn_relu layers; a bare block when n == 1 keeps reference nesting."""
    if n == 1:
        return conv_bn_relu(channels, channels)
    return nn.Sequential(*(conv_bn_relu(channels, channels) for _ in range(n)))


def scaled_filters(width: float) -> list[int]:
    """Per-level channel counts for a width multiplier (rounded, at least 1)."""
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    return [scaled(f, width) for f in BASE_FILTERS]


def init_weights(module: nn.Module) -> None:
    """Reference (MTAN) init: xavier-normal weights and zero biases; BatchNorm at identity."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class SegNet(MultiTaskModel):
    """Shared SegNet encoder/decoder with one head per task (a one-head SegNet is the STL net).

    ``features["encoder"]`` is the last pooled encoder map, ``[B, filters[-1], ~H/32,
    ~W/32]``; unpooling is given explicit output sizes so inputs whose sides are not multiples
    of 32 come back at their own resolution.
    """

    def __init__(
        self, heads: Mapping[str, HeadSpec], width: float = 1.0, in_channels: int = 3
    ) -> None:
        super().__init__()
        if not heads:
            raise ValueError("SegNet needs at least one head")
        f = scaled_filters(width)
        self.filters = f
        n = len(f)

        self.encoder_block = nn.ModuleList(
            conv_bn_relu(in_channels if i == 0 else f[i - 1], f[i]) for i in range(n)
        )
        self.conv_block_enc = nn.ModuleList(_repeat_block(f[i], EXTRA_CONVS[i]) for i in range(n))
        # decoder level i maps f[i] -> f[i-1], with f[-1] := f[0] at level 0.
        dec_out = [f[0], *f[:-1]]
        self.decoder_block = nn.ModuleList(conv_bn_relu(f[i], dec_out[i]) for i in range(n))
        self.conv_block_dec = nn.ModuleList(
            _repeat_block(dec_out[i], EXTRA_CONVS[i]) for i in range(n)
        )
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(kernel_size=2, stride=2)

        self.heads = nn.ModuleDict(
            {
                task: nn.Sequential(
                    nn.Conv2d(f[0], f[0], kernel_size=3, padding=1),
                    nn.Conv2d(f[0], spec.channels, kernel_size=1),
                )
                for task, spec in heads.items()
            }
        )
        # Activations are plain callables, not modules: keep them out of the module tree.
        self.activations = {task: spec.activation for task, spec in heads.items()}
        init_weights(self)

    @property
    def tasks(self) -> list[str]:
        """Task names in head order."""
        return list(self.heads.keys())

    @property
    def encoder_info(self) -> FeatureInfo:
        """The last pooled map: every level pools by 2 (flooring odd sides)."""
        r = 2 ** len(self.filters)
        return FeatureInfo(self.filters[-1], r, floor_size(r), tuple(self.filters))

    def shared_parameters(self) -> list[nn.Parameter]:
        """Encoder and decoder (everything but the heads), in forward order."""
        return [p for name, p in self.named_parameters() if not name.startswith("heads.")]

    def encode(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[tuple[int, int]]]:
        """The last pooled map, with the pooling indices and pre-pool sizes the decoder needs."""
        indices: list[Tensor] = []
        sizes: list[tuple[int, int]] = []
        h = x
        for enc, extra in zip(self.encoder_block, self.conv_block_enc, strict=True):
            h = extra(enc(h))
            sizes.append((h.shape[-2], h.shape[-1]))
            h, idx = self.pool(h)
            indices.append(idx)
        return h, indices, sizes

    def decode(self, h: Tensor, indices: list[Tensor], sizes: list[tuple[int, int]]) -> Tensor:
        """Unpool to the recorded sizes and decode back to the first level's width."""
        for i in reversed(range(len(self.filters))):
            h = self.unpool(h, indices[i], output_size=sizes[i])
            h = self.conv_block_dec[i](self.decoder_block[i](h))
        return h

    def forward(self, x: Tensor) -> ModelOutput:
        """Encode with pooling indices, decode by unpooling to the recorded sizes, run heads."""
        encoder_feature, indices, sizes = self.encode(x)
        h = self.decode(encoder_feature, indices, sizes)
        preds = {task: self.activations[task](head(h)) for task, head in self.heads.items()}
        return ModelOutput(preds=preds, features={"encoder": encoder_feature, "shared": h})


@MODELS.register("segnet")
def segnet(heads: Mapping[str, HeadSpec], width: float = 1.0, in_channels: int = 3) -> SegNet:
    """SegNet encoder-decoder with one head per task (the paper's NYUv2/Cityscapes model)."""
    return SegNet(heads=heads, width=width, in_channels=in_channels)
