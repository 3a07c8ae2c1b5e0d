"""The multi-task network of the TaskTransferNet framework (seed 003, ``xtask_mt``).

A torchvision ResNet encoder shared by all tasks, and one U-Net style decoder per task: five
blocks of three conv3x3-BN-ReLU layers, each followed by a bilinear upsampling x2, the next
block reading the upsampled map concatenated with the encoder map of that resolution (ResNet
stages 3, 2, 1 and the stride-2 stem output), then a bias-free 1x1 conv head whose output goes
through the task's activation (:class:`~mtpsl.models.base.HeadSpec`).

The transfer networks of the framework are not part of this model: they exist only to shape
the training loss, so the method ``xtask`` (:mod:`mtpsl.methods.xtask`) owns them and the
model stays usable by every other method.

The decoder's 3x3 convolutions are those of the reference at its HEAD (akarimoon/xtask_mt;
an older commit used 1x1 convolutions there, which earlier versions of this docstring
described). One difference, on purpose: the reference upsamples by a fixed x2, which needs
input sides divisible by 32; here each upsampling goes to the size of the skip map it meets, so
any input size comes back at its own resolution. See docs/fidelity.md.

Departures from the papers and reference code, with the options and tests that pin them:
``docs/fidelity.md``, section "xtask".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtpsl.core.errors import ConfigError
from mtpsl.models.base import MODELS, FeatureInfo, HeadSpec, ModelOutput, MultiTaskModel, scaled
from mtpsl.models.encoders import EncoderSpec
from mtpsl.models.encoders.resnet import ResNetTrunk, resnet_trunk
from mtpsl.models.segnet import conv_bn_relu, init_weights

MID_CHANNELS = 128
DEFAULT_DEPTH = 34
"""The seed's default encoder (``enc_layers``); used when no backbone config is given."""
STEM_CHANNELS = 64
"""Width of the stride-2 stem output (conv1-BN-ReLU) of every torchvision ResNet."""


class DecoderBlock(nn.Module):
    """Three conv3x3-BN-ReLU layers, then bilinear upsampling (x2, or to a given size)."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            conv_bn_relu(in_channels, channels),
            conv_bn_relu(channels, channels),
            conv_bn_relu(channels, channels),
        )

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        h = self.convs(x)
        return F.interpolate(h, size=tuple(size), mode="bilinear", align_corners=True)


class UNetDecoder(nn.Module):
    """Five decoder blocks fed with the encoder pyramid, deepest first, then a 1x1 head."""

    def __init__(self, skip_channels: Sequence[int], mid: int, out_channels: int) -> None:
        super().__init__()
        deepest, *skips = skip_channels
        inputs = [deepest, *(mid + c for c in skips)]
        self.blocks = nn.ModuleList(DecoderBlock(c, mid) for c in inputs)
        self.head = nn.Conv2d(mid, out_channels, kernel_size=1, bias=False)

    def forward(self, pyramid: Sequence[Tensor], size: Sequence[int]) -> Tensor:
        """``pyramid``: encoder maps deepest first; ``size``: the output resolution."""
        deepest, *skips = pyramid
        targets = [s.shape[-2:] for s in skips] + [tuple(size)]
        h = self.blocks[0](deepest, targets[0])
        for block, skip, target in zip(self.blocks[1:], skips, targets[1:], strict=True):
            h = block(torch.cat([h, skip], dim=1), target)
        return self.head(h)


class XTaskNet(MultiTaskModel):
    """Shared ResNet encoder + one U-Net decoder per task (TaskTransferNet's multi-task net).

    ``features["encoder"]`` is the last ResNet stage, ``[B, channels[-1], ~H/32, ~W/32]``.
    """

    def __init__(
        self,
        heads: Mapping[str, HeadSpec],
        trunk: ResNetTrunk,
        width: float = 1.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if not heads:
            raise ValueError("XTaskNet needs at least one head")
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        if in_channels != 3:  # a fresh first conv; the rest of the trunk is unchanged
            trunk.stem[0] = nn.Conv2d(in_channels, STEM_CHANNELS, 7, 2, 3, bias=False)
        self.encoder = trunk
        self.mid_channels = scaled(MID_CHANNELS, width)
        skips = [*reversed(trunk.channels), STEM_CHANNELS]
        self.decoders = nn.ModuleDict(
            {
                task: UNetDecoder(skips, self.mid_channels, spec.channels)
                for task, spec in heads.items()
            }
        )
        init_weights(self.decoders)  # the seed's: xavier-normal convs, BN at identity
        # Activations are plain callables, not modules: keep them out of the module tree.
        self.activations = {task: spec.activation for task, spec in heads.items()}

    @property
    def tasks(self) -> list[str]:
        return list(self.decoders.keys())

    @property
    def encoder_info(self) -> FeatureInfo:
        trunk = self.encoder
        return FeatureInfo(trunk.channels[-1], trunk.reductions[-1], trunk.feature_size)

    def shared_parameters(self) -> list[nn.Parameter]:
        """The encoder: the only parameters every task's loss flows through."""
        return list(self.encoder.parameters())

    def encode(self, x: Tensor) -> list[Tensor]:
        """Encoder maps deepest first: stages 4, 3, 2, 1 and the stride-2 stem output."""
        stem = self.encoder.stem
        c0 = stem[2](stem[1](stem[0](x)))  # conv1-BN-ReLU, before the max-pool
        h = stem[3](c0)
        stages = []
        for stage in self.encoder.stages:
            h = stage(h)
            stages.append(h)
        return [*reversed(stages), c0]

    def forward(self, x: Tensor) -> ModelOutput:
        pyramid = self.encode(x)
        size = x.shape[-2:]
        preds = {
            task: self.activations[task](decoder(pyramid, size))
            for task, decoder in self.decoders.items()
        }
        return ModelOutput(preds=preds, features={"encoder": pyramid[0]})


@MODELS.register("xtask_net")
def xtask_net(
    heads: Mapping[str, HeadSpec],
    width: float = 1.0,
    backbone: EncoderSpec | None = None,
    in_channels: int = 3,
) -> XTaskNet:
    """TaskTransferNet's ResNet U-Net with task-transfer networks (xtask_mt).

    ``backbone.depth`` and ``backbone.weights`` pick the encoder.

    ``backbone.output_stride`` is not used: the five-level U-Net decoder needs the plain
    stride-32 ResNet pyramid. Without a backbone config the seed's ResNet-34 (random init).
    """
    if backbone is not None and backbone.name != "resnet":
        raise ConfigError(f"model.backbone.name: xtask_net's U-Net decoder taps the ResNet "
                          f"stem; it needs the resnet encoder, not {backbone.name!r}")
    depth = backbone.depth if backbone is not None else DEFAULT_DEPTH
    weights = backbone.weights if backbone is not None else None
    trunk = resnet_trunk(depth, weights=weights, output_stride=32)
    return XTaskNet(heads, trunk, width=width, in_channels=in_channels)
