"""Any encoder with one dense head per task (registered as ``dense``, and as ``resnet``, its
name from when the encoder was always a dilated torchvision ResNet).

The encoder is chosen by ``model.backbone`` (``mtpsl list encoders``): ``resnet`` (torchvision
ResNet-{18..152}, output stride 8/16/32 by dilating the last stages) or ``timm`` (any timm
model with ``features_only``: ConvNeXt, Swin, HRNet, EfficientNet, ...); random init unless
``model.backbone.weights`` names a local checkpoint (never downloaded). ``model.options.neck``
chooses what the heads see:

- ``none`` (default): the encoder's last map (DeepLab/PSP on a dilated ResNet);
- ``fpn``: a light feature pyramid over every map the encoder returns, fused at the finest
  one (the multi-scale decoder that transformer and ConvNeXt encoders want; see
  :class:`~mtpsl.models.heads.FPNNeck`).

Each task gets a head from :mod:`mtpsl.models.heads`, chosen by ``model.options.head``:

- unset: ``psp`` for class-map tasks (labels are class indices, e.g. segmentation) and
  ``conv`` (conv + upsampling decoder) for dense regression (depth, normals), as SemiMTL's
  generator;
- a string: that head for every task;
- a mapping whose keys are task names or task kinds (``segmentation``, ``depth``, ``normal``,
  ... as registered in ``TASKS``), e.g. ``{segmentation: aspp, depth: conv}``; task names win
  over kinds, unmapped tasks keep the default.

Logits are resized bilinearly to the input size before the task activation.
``features["encoder"]`` is the encoder's last map (its channels, stride and size rule are the
model's ``encoder_info``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from mtpsl.core.errors import ConfigError
from mtpsl.models.base import MODELS, FeatureInfo, HeadSpec, ModelOutput, MultiTaskModel, scaled
from mtpsl.models.encoders import EncoderSpec, build_encoder
from mtpsl.models.heads import FPN_CHANNELS, HEAD_KINDS, PSP_BINS, FPNNeck, build_head
from mtpsl.tasks import TASKS

HeadOption = str | Mapping[str, str] | None


def default_head(spec: HeadSpec) -> str:
    """PSP for class-map tasks (labels without channels), the conv decoder otherwise."""
    return "psp" if spec.class_map else "conv"


def resolve_heads(option: HeadOption, heads: Mapping[str, HeadSpec]) -> dict[str, str]:
    """Per-task head kind from ``model.options.head`` (see the module docstring)."""
    chosen = {name: default_head(spec) for name, spec in heads.items()}
    if option is None:
        return chosen
    if isinstance(option, str):
        _check_kind(option, "model.options.head")
        return dict.fromkeys(heads, option)
    if not isinstance(option, Mapping):
        raise ConfigError(
            f"model.options.head: expected a head name or a mapping task -> head, got {option!r}"
        )
    kinds = set(TASKS.names())
    for key, kind in option.items():
        _check_kind(kind, f"model.options.head.{key}")
        if key not in heads and key not in kinds:
            raise ConfigError(
                f"model.options.head.{key}: neither a task ({', '.join(heads)}) nor a task kind "
                f"({', '.join(sorted(kinds))})"
            )
    for name, spec in heads.items():
        by_kind = option.get(spec.kind or "")
        chosen[name] = option.get(name, by_kind or chosen[name])
    return chosen


def _check_kind(kind: object, key: str) -> None:
    if kind not in HEAD_KINDS:
        raise ConfigError(f"{key}: unknown head {kind!r}; allowed: {', '.join(HEAD_KINDS)}")


def _positive_ints(value: Sequence[int] | None, key: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, Sequence)
        or not value
        or not all(isinstance(v, int) and v > 0 for v in value)
    ):
        raise ConfigError(f"{key}: expected a non-empty list of positive integers, got {value!r}")
    return tuple(value)


NECKS: tuple[str, ...] = ("none", "fpn")


class DenseModel(MultiTaskModel):
    """Encoder (+ optional FPN neck) + per-task heads; see the module docstring."""

    def __init__(
        self,
        heads: Mapping[str, HeadSpec],
        width: float = 1.0,
        in_channels: int = 3,
        backbone: EncoderSpec | None = None,
        head: HeadOption = None,
        aspp_rates: Sequence[int] | None = None,
        psp_bins: Sequence[int] = PSP_BINS,
        neck: str = "none",
    ) -> None:
        super().__init__()
        if not heads:
            raise ValueError("DenseModel needs at least one head")
        if neck not in NECKS:
            raise ConfigError(f"model.options.neck: {neck!r}; allowed: {', '.join(NECKS)}")
        self.trunk = build_encoder(backbone or EncoderSpec(), in_channels)
        channels, reductions = self.trunk.channels, self.trunk.reductions
        self.neck = None
        head_in, head_stride = channels[-1], reductions[-1]
        if neck == "fpn":
            self.neck = FPNNeck(channels, scaled(FPN_CHANNELS, width))
            head_in, head_stride = self.neck.out_channels, reductions[0]
        self.head_kinds = resolve_heads(head, heads)
        rates = _positive_ints(aspp_rates, "model.options.aspp_rates")
        bins = _positive_ints(psp_bins, "model.options.psp_bins") or PSP_BINS
        self.heads = nn.ModuleDict(
            {
                name: build_head(self.head_kinds[name], head_in, spec.channels, head_stride,
                                 width, rates, bins)
                for name, spec in heads.items()
            }
        )
        self.activations = {name: spec.activation for name, spec in heads.items()}

    @property
    def tasks(self) -> list[str]:
        return list(self.heads.keys())

    @property
    def encoder_info(self) -> FeatureInfo:
        trunk = self.trunk
        return FeatureInfo(trunk.channels[-1], trunk.reductions[-1], trunk.feature_size)

    def shared_parameters(self) -> list[nn.Parameter]:
        """The encoder and the neck, in forward order."""
        neck = [] if self.neck is None else list(self.neck.parameters())
        return [*self.trunk.parameters(), *neck]

    def forward(self, x: Tensor) -> ModelOutput:
        maps = self.trunk(x)
        shared = maps[-1] if self.neck is None else self.neck(maps)
        size = x.shape[-2:]
        preds = {}
        for name, head in self.heads.items():
            logits = head(shared)
            if logits.shape[-2:] != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            preds[name] = self.activations[name](logits)
        return ModelOutput(preds=preds, features={"encoder": maps[-1], "shared": shared})


@MODELS.register("dense")
@MODELS.register("resnet")
def dense(
    heads: Mapping[str, HeadSpec],
    width: float = 1.0,
    in_channels: int = 3,
    backbone: EncoderSpec | None = None,
    *,
    head: HeadOption = None,
    aspp_rates: Sequence[int] | None = None,
    psp_bins: Sequence[int] = PSP_BINS,
    neck: str = "none",
) -> DenseModel:
    """Any encoder (model.backbone: torchvision ResNet, any timm model) with DeepLab/PSP/conv
    heads per task, optionally over an FPN neck (PASCAL-Context's model on a dilated ResNet).

    Keyword-only arguments are ``model.options`` (head, aspp_rates, psp_bins, neck)."""
    return DenseModel(heads, width, in_channels, backbone, head, aspp_rates, psp_bins, neck)
