"""Dilated ResNet encoder with one dense head per task (registered as model ``resnet``).

The encoder is a torchvision ResNet-{18,34,50,101,152} (``model.backbone``: depth, local
weights, output stride 8/16/32 by dilating the last stages); random init unless
``model.backbone.weights`` names a local checkpoint (never downloaded). Each task gets a head
from :mod:`mtpsl.models.heads` on the last stage's map, chosen by ``model.options.head``:

- unset: ``psp`` for class-map tasks (labels are class indices, e.g. segmentation) and
  ``conv`` (conv + upsampling decoder) for dense regression (depth, normals), as SemiMTL's
  generator;
- a string: that head for every task;
- a mapping whose keys are task names or task kinds (``segmentation``, ``depth``, ``normal``,
  ... as registered in ``TASKS``), e.g. ``{segmentation: aspp, depth: conv}``; task names win
  over kinds, unmapped tasks keep the default.

Logits are resized bilinearly to the input size before the task activation.
``features["encoder"]`` is the last stage's map, ``[B, C, ceil(H/os), ceil(W/os)]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import BackboneConfig
from ..errors import ConfigError
from ..tasks import TASKS, Task, task_kind
from .base import MODELS, HeadSpec, ModelOutput
from .heads import HEAD_KINDS, PSP_BINS, build_head
from .resnet_trunk import resnet_trunk

HeadOption = str | Mapping[str, str] | None


def task_of(spec: HeadSpec) -> Task | None:
    """The task behind a head spec (its activation is a bound ``Task.activate``), if any."""
    owner = getattr(spec.activation, "__self__", None)
    return owner if isinstance(owner, Task) else None


def kind_of(task: Task | None) -> str | None:
    """The ``TASKS`` registry name of a task's class (``segmentation``, ``depth``, ...)."""
    return None if task is None else task_kind(task)


def default_head(spec: HeadSpec) -> str:
    """PSP for class-map tasks (labels without channels), the conv decoder otherwise."""
    task = task_of(spec)
    return "psp" if task is not None and task.label_dims == 0 else "conv"


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
        by_kind = option.get(kind_of(task_of(spec)) or "")
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


class DilatedResNet(nn.Module):
    """ResNet trunk + per-task heads; see the module docstring."""

    def __init__(
        self,
        heads: Mapping[str, HeadSpec],
        width: float = 1.0,
        in_channels: int = 3,
        backbone: BackboneConfig | None = None,
        head: HeadOption = None,
        aspp_rates: Sequence[int] | None = None,
        psp_bins: Sequence[int] = PSP_BINS,
    ) -> None:
        super().__init__()
        if not heads:
            raise ValueError("DilatedResNet needs at least one head")
        bb = backbone or BackboneConfig()
        self.trunk = resnet_trunk(bb.depth, bb.weights, bb.output_stride)
        if in_channels != 3:  # a fresh stem conv: pretrained RGB filters do not apply
            old = self.trunk.stem[0]
            self.trunk.stem[0] = nn.Conv2d(in_channels, old.out_channels, 7, 2, 3, bias=False)
        self.encoder_channels = self.trunk.channels[-1]
        self.encoder_reduction = bb.output_stride
        self.head_kinds = resolve_heads(head, heads)
        rates = _positive_ints(aspp_rates, "model.options.aspp_rates")
        bins = _positive_ints(psp_bins, "model.options.psp_bins") or PSP_BINS
        self.heads = nn.ModuleDict(
            {
                name: build_head(
                    self.head_kinds[name],
                    self.encoder_channels,
                    spec.channels,
                    bb.output_stride,
                    width,
                    rates,
                    bins,
                )
                for name, spec in heads.items()
            }
        )
        self.activations = {name: spec.activation for name, spec in heads.items()}

    @property
    def tasks(self) -> list[str]:
        return list(self.heads.keys())

    def feature_size(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size of ``features["encoder"]`` for an input of this size (every strided
        layer of a ResNet rounds up)."""
        r = self.encoder_reduction
        return math.ceil(height / r), math.ceil(width / r)

    def shared_parameters(self) -> list[nn.Parameter]:
        """The ResNet trunk, in forward order."""
        return list(self.trunk.parameters())

    def forward(self, x: Tensor) -> ModelOutput:
        feature = self.trunk(x)[-1]
        size = x.shape[-2:]
        preds = {}
        for name, head in self.heads.items():
            logits = head(feature)
            if logits.shape[-2:] != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            preds[name] = self.activations[name](logits)
        return ModelOutput(preds=preds, features={"encoder": feature})


@MODELS.register("resnet")
def resnet(
    heads: Mapping[str, HeadSpec],
    width: float = 1.0,
    in_channels: int = 3,
    backbone: BackboneConfig | None = None,
    *,
    head: HeadOption = None,
    aspp_rates: Sequence[int] | None = None,
    psp_bins: Sequence[int] = PSP_BINS,
) -> DilatedResNet:
    """Dilated torchvision ResNet with DeepLab/PSP heads per task (PASCAL-Context's model).

    Keyword-only arguments are ``model.options`` (head, aspp_rates, psp_bins)."""
    return DilatedResNet(heads, width, in_channels, backbone, head, aspp_rates, psp_bins)
