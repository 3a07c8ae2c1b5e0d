"""Any timm model that supports ``features_only`` (ConvNeXt, Swin, HRNet, EfficientNet, ViT
through its feature wrapper, timm's ResNets, ...), chosen by ``model.backbone.arch``.

Weights are never downloaded: ``model.backbone.weights`` names a local file, which timm loads
into the full model before cutting it to its feature stages (``pretrained_cfg_overlay`` with
``file=``; a ``.safetensors`` file or a ``.pth``/``.bin`` state dict of the classification
model, as ``timm.create_model(arch).state_dict()`` saves it). ``model.backbone.output_stride``
below 32 is passed to timm (dilated last stages) for the architectures that take it;
``model.backbone.options`` are further ``timm.create_model`` keyword arguments (e.g.
``out_indices``, ``drop_path_rate``). Channels and reductions come from timm's
``feature_info``; the size of the last map is measured once per input size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mtpsl.core.errors import ConfigError
from mtpsl.models.encoders.base import ENCODERS, Encoder, EncoderSpec

RESERVED = ("features_only", "pretrained", "pretrained_cfg_overlay", "in_chans", "output_stride")


class TimmEncoder(Encoder):
    """A timm ``features_only`` network behind the encoder contract."""

    def __init__(self, spec: EncoderSpec, in_channels: int = 3) -> None:
        super().__init__()
        self.spec, self.in_channels = spec, in_channels
        self.net = _create(spec, in_channels)
        info: Any = self.net.feature_info  # timm's FeatureInfo
        self.channels = tuple(int(c) for c in info.channels())
        self.reductions = tuple(int(r) for r in info.reduction())
        self._sizes: dict[tuple[int, int], tuple[int, int]] = {}

    @classmethod
    def contract_spec(cls, name: str) -> EncoderSpec:
        """ConvNeXt-atto, the smallest timm ConvNeXt (an architecture must be named)."""
        return EncoderSpec(name=name, arch="convnext_atto", output_stride=32)

    def forward(self, x: Tensor) -> list[Tensor]:
        return list(self.net(x))

    def set_in_channels(self, in_channels: int) -> None:
        if in_channels != self.in_channels:  # timm adapts the stem (and pretrained filters)
            self.in_channels = in_channels
            self.net = _create(self.spec, in_channels)
            self._sizes.clear()

    def feature_size(self, height: int, width: int) -> tuple[int, int]:
        """Measured with a blank image in eval mode, once per size: architectures differ in
        how they round (padded convs round up, patch embeddings floor)."""
        key = (int(height), int(width))
        if key not in self._sizes:
            param = next(self.net.parameters())
            was_training = self.net.training
            self.net.eval()
            try:
                with torch.no_grad():
                    blank = torch.zeros(1, self.in_channels, *key, device=param.device,
                                        dtype=param.dtype)
                    last = self.net(blank)[-1]
            finally:
                self.net.train(was_training)
            self._sizes[key] = (int(last.shape[-2]), int(last.shape[-1]))
        return self._sizes[key]


def _create(spec: EncoderSpec, in_channels: int) -> nn.Module:
    try:
        import timm
    except ImportError:  # a core dependency; only a broken install lacks it
        raise ConfigError("model.backbone.name: timm is not installed (pip install timm)") from None
    if not spec.arch:
        raise ConfigError("model.backbone.arch: name the timm model (e.g. convnext_atto, "
                          "resnet50, swin_tiny_patch4_window7_224); see timm.list_models()")
    if spec.arch not in timm.list_models():
        close = timm.list_models(f"*{spec.arch.split('.')[0][:8]}*")[:8]
        raise ConfigError(f"model.backbone.arch: timm has no model {spec.arch!r}"
                          + (f"; similar: {', '.join(close)}" if close else ""))
    clash = sorted(set(spec.options) & set(RESERVED))
    if clash:
        raise ConfigError(f"model.backbone.options: {clash} are set by mtpsl (use "
                          f"model.backbone.weights / output_stride instead)")
    kwargs = dict(spec.options)
    if spec.output_stride != 32:
        kwargs["output_stride"] = spec.output_stride
    if spec.weights is not None:
        path = Path(spec.weights)
        if not path.is_file():
            raise ConfigError(f"model.backbone.weights: {path} does not exist (weights are "
                              "never downloaded; give a local timm checkpoint)")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    try:
        return timm.create_model(spec.arch, features_only=True, in_chans=in_channels, **kwargs)
    except (RuntimeError, TypeError, ValueError, KeyError, AssertionError) as err:
        raise ConfigError(f"model.backbone: timm cannot build {spec.arch!r} with "
                          f"{_describe(kwargs)}: {err}") from None


def _describe(kwargs: dict) -> str:
    shown = {k: v for k, v in kwargs.items() if k != "pretrained_cfg_overlay"}
    return ", ".join(f"{k}={v!r}" for k, v in shown.items()) or "its defaults"


@ENCODERS.register("timm")
def timm_encoder(spec: EncoderSpec) -> TimmEncoder:
    """Any timm model with ``features_only`` support (``model.backbone.arch``); weights from a
    local file (``model.backbone.weights``), never downloaded."""
    return TimmEncoder(spec)
