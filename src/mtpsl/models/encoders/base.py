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
    return encoder
