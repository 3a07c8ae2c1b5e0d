"""torchvision ResNet encoders (18 to 152), built without a download and loaded from a local
file; dilated to output stride 8/16 (DeepLab/PSP style) or plain (32).

Every ResNet-based architecture in mtpsl (dilated ResNet + PSP/ASPP heads, TaskTransferNet,
ResNet mapping networks) gets its encoder here, so weight loading and dilation are handled once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from mtpsl.core.errors import ConfigError
from mtpsl.models.encoders.base import ENCODERS, Encoder, EncoderSpec

if TYPE_CHECKING:
    from torchvision.models import resnet

# torchvision is imported where a ResNet is built: importing it pulls in torch._dynamo (about
# 2 s), which the commands that build no ResNet and no optimiser (list, config show, eval of
# a SegNet...) need not pay; training pays it anyway when torch.optim first runs.
DEPTHS = (18, 34, 50, 101, 152)


class ResNetTrunk(Encoder):
    """ResNet stem + 4 stages; forward returns the stage outputs ``[c1, c2, c3, c4]``.

    ``channels`` gives their widths; ``reductions`` their strides w.r.t. the input.
    """

    def __init__(self, net: resnet.ResNet, output_stride: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        from torchvision.models import resnet

        expansion = 4 if isinstance(net.layer1[0], resnet.Bottleneck) else 1
        self.channels = (64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion)
        self.reductions = (4, 8, min(16, output_stride), output_stride)

    @classmethod
    def contract_spec(cls, name: str) -> EncoderSpec:
        """ResNet-18 (BasicBlock stages, the ones dilated here) at output stride 16."""
        return EncoderSpec(name=name, depth=18, output_stride=16)

    def feature_size(self, height: int, width: int) -> tuple[int, int]:
        """Every strided layer of a ResNet rounds up."""
        r = self.reductions[-1]
        return math.ceil(height / r), math.ceil(width / r)

    def set_in_channels(self, in_channels: int) -> None:
        if in_channels != 3:  # a fresh stem conv: pretrained RGB filters do not apply
            old = self.stem[0]
            assert isinstance(old, nn.Conv2d)
            self.stem[0] = nn.Conv2d(in_channels, old.out_channels, 7, 2, 3, bias=False)

    def forward(self, x: Tensor) -> list[Tensor]:
        h = self.stem(x)
        outs = []
        for stage in self.stages:
            h = stage(h)
            outs.append(h)
        return outs


def resnet_trunk(
    depth: int, weights: str | Path | None = None, output_stride: int = 32
) -> ResNetTrunk:
    """A torchvision ResNet-``depth`` trunk; dilation replaces the last strides for OS 8/16.

    ResNet-18/34 (BasicBlock) cannot be dilated by torchvision's flag, so their last stages
    are dilated here by editing the convolutions in place (stride 1, dilation/padding 2 or 4).
    """
    if depth not in DEPTHS:
        raise ConfigError(f"model.backbone.depth: {depth} unknown; allowed: {sorted(DEPTHS)}")
    if output_stride not in (8, 16, 32):
        raise ConfigError(f"model.backbone.output_stride: {output_stride}; allowed: 8, 16, 32")
    dilate = [output_stride <= 8, output_stride <= 16]
    bottleneck = depth >= 50
    from torchvision.models import resnet

    build = getattr(resnet, f"resnet{depth}")
    net = build(weights=None, replace_stride_with_dilation=[False, *dilate] if bottleneck else None)
    if weights is not None:
        load_local_weights(net, weights)
    if not bottleneck:  # same rates as torchvision's flag gives Bottleneck stages
        if output_stride == 8:
            _dilate_basic_stage(net.layer3, previous=1, rate=2)
            _dilate_basic_stage(net.layer4, previous=2, rate=4)
        elif output_stride == 16:
            _dilate_basic_stage(net.layer4, previous=1, rate=2)
    return ResNetTrunk(net, output_stride)


def _dilate_basic_stage(stage: nn.Sequential, previous: int, rate: int) -> None:
    """Stride 1 instead of 2; the first conv keeps the previous dilation, the rest use rate."""
    for i, block in enumerate(stage):
        from torchvision.models import resnet

        assert isinstance(block, resnet.BasicBlock)
        block.conv1.stride = (1, 1)
        if isinstance(block.downsample, nn.Sequential):
            shortcut = block.downsample[0]
            assert isinstance(shortcut, nn.Conv2d)
            shortcut.stride = (1, 1)
        for conv in (block.conv1, block.conv2):
            assert isinstance(conv, nn.Conv2d)
            d = previous if (i == 0 and conv is block.conv1) else rate
            conv.dilation, conv.padding = (d, d), (d, d)


def load_local_weights(net: nn.Module, path: str | Path) -> None:
    """Load a torchvision-style state dict from ``path`` (weights_only); the classifier
    (``fc.*``) may be absent or mismatched, everything else must match."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model.backbone.weights: {path} does not exist (weights are never "
                          "downloaded; give a local torchvision checkpoint)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, not a state dict
        raise ConfigError(f"model.backbone.weights: cannot read {path}: {err}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"model.backbone.weights: {path} does not hold a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}
    own = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(set(own) - set(state))
    bad = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or bad:
        raise ConfigError(
            f"model.backbone.weights: {path} does not fit this ResNet "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"wrong shape {bad[:3]}{'...' if len(bad) > 3 else ''}); check model.backbone.depth"
        )
    net.load_state_dict(state, strict=False)


@ENCODERS.register("resnet")
def torchvision_resnet(spec: EncoderSpec) -> ResNetTrunk:
    """torchvision ResNet (``model.backbone.depth``: 18, 34, 50, 101, 152), dilated for output
    stride 8/16; a local torchvision state dict in ``model.backbone.weights``."""
    if spec.options:
        raise ConfigError(f"model.backbone.options: the resnet encoder takes none, got "
                          f"{sorted(spec.options)}")
    return resnet_trunk(spec.depth, spec.weights, spec.output_stride)
