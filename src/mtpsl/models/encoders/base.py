"""The encoder contract (in the manner of timm's ``feature_info`` and smp's ``EncoderMixin``).

An :class:`Encoder` maps an image ``[B, C, H, W]`` to a list of feature maps, finest first;
``channels[i]`` and ``reductions[i]`` declare map ``i``'s width and stride. Models size their
decoders and heads from these declarations, and cross-task methods size their mapping networks
from the model's last (deepest) map, so no consumer probes an encoder's type.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mtpsl.core.errors import ConfigError
from mtpsl.core.registry import Registry


@dataclass(frozen=True)
class EncoderSpec:
    """Which encoder to build (the ``model.backbone`` config section, as plain values)."""

    name: str = "resnet"
    depth: int = 50
    arch: str | None = None
    weights: str | None = None
    output_stride: int = 8
    options: Mapping[str, Any] = field(default_factory=dict)
    normalize: str = "none"


class Encoder(nn.Module, ABC):
    """Image -> feature maps ``[f_0, ..., f_n]`` (finest first); see the module docstring."""

    channels: tuple[int, ...]
    """Width of each returned map."""
    reductions: tuple[int, ...]
    """Stride of each returned map relative to the input (e.g. 4, 8, 16, 32)."""

    @abstractmethod
    def forward(self, x: Tensor) -> list[Tensor]: ...

    @abstractmethod
    def feature_size(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size of the last map for an input of this size."""

    @classmethod
    def contract_spec(cls, name: str) -> EncoderSpec:
        """A small spec of this encoder registered as ``name``: ``tests/test_registries.py``
        builds it from this to check it against this contract (it finds the class from the
        builder's return annotation). Default: the config's defaults; an encoder that needs
        more (timm's ``arch``) or is large by default overrides it."""
        return EncoderSpec(name=name)

    def set_in_channels(self, in_channels: int) -> None:
        """Take ``in_channels``-channel inputs (a fresh first layer; pretrained RGB filters
        do not apply). Encoders that cannot change it refuse."""
        if in_channels != 3:
            raise ConfigError(f"model: encoder {type(self).__name__} takes 3-channel images only")


EncoderBuilder = Callable[[EncoderSpec], Encoder]
ENCODERS: Registry[EncoderBuilder] = Registry("encoder")


def build_encoder(spec: EncoderSpec, in_channels: int = 3) -> Encoder:
    """The registered encoder ``spec.name``, taking ``in_channels``-channel images."""
    try:
        build = ENCODERS.get(spec.name)
    except KeyError as err:
        raise ConfigError(f"model.backbone.name: {err.args[0]}") from None
    encoder = build(spec)
    encoder.set_in_channels(in_channels)
    if spec.normalize == "imagenet":
        normalize_input(encoder, IMAGENET_MEAN, IMAGENET_STD)
    elif spec.normalize != "none":
        raise ConfigError(f"model.backbone.normalize: unknown {spec.normalize!r}; known: "
                          "imagenet, none")
    return encoder


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""The channel statistics ImageNet weights were trained with (torchvision's and timm's)."""


def normalize_input(encoder: Encoder, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """Normalise the encoder's input channels first, inside its forward (a pre-hook, so the
    state dict and every consumer stay as they are; the statistics are non-persistent
    buffers that follow the module's device and dtype). Channels beyond the three RGB ones
    (an extra input, e.g. a mapping network's task channels) pass through unchanged."""
    encoder.register_buffer("input_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
    encoder.register_buffer("input_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def hook(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        x, *rest = args
        mean, std = module.get_buffer("input_mean"), module.get_buffer("input_std")
        n = mean.shape[1]
        rgb = (x[:, :n] - mean) / std
        return (torch.cat([rgb, x[:, n:]], 1) if x.shape[1] > n else rgb, *rest)

    encoder.register_forward_pre_hook(hook)
