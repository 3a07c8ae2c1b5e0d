"""Model contract shared by every architecture: heads in, activated predictions out.

Every model is a :class:`MultiTaskModel`: ``forward(x) -> ModelOutput``, its task names, its
heads' activations, the parameters every task shares (required: gradient weightings act on
them) and, when it has one shared encoder, that encoder's last feature as :class:`FeatureInfo`.
Methods only ever see this contract, so any network that keeps it can be swapped in by
registry name without touching them.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

from mtpsl.core.errors import ConfigError
from mtpsl.core.registry import Registry
from mtpsl.tasks.base import Task, task_kind

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


@dataclass(frozen=True)
class HeadSpec:
    """What one task head must produce.

    The activation lives with the task definition (log-softmax for segmentation, identity for
    depth, L2 normalisation for normals), not with the architecture, so an architecture never
    needs to know which tasks it serves.
    """

    channels: int
    activation: Callable[[Tensor], Tensor]
    kind: str | None = None
    """The task type's registered name (``segmentation``, ``depth``...), by which
    ``model.options.head`` may choose a head per task type; None for heads of no task."""
    class_map: bool = False
    """The head scores classes (the task's label is a class map): dense models give such heads
    a pyramid-pooling decoder by default."""

    @classmethod
    def of(cls, task: Task) -> HeadSpec:
        """The head a task needs."""
        return cls(task.out_channels, task.activate, task_kind(task), task.label_dims == 0)


@dataclass
class ModelOutput:
    """Forward result of every model.

    ``preds`` holds activated per-task predictions at input resolution. ``features`` holds
    named intermediate maps; ``"encoder"`` is the shared encoder's last pooled map, which
    cross-task consistency methods (e.g. MTPSL's mapping network) consume. ``"shared"``, when
    a model has it, is the one map every head reads and the only way the shared parameters
    reach the predictions (SegNet's decoder output, a dense model's encoder or neck output):
    gradient weightings with ``method.weighting_gradients=representation`` differentiate the
    task losses with respect to it. A model whose heads read several shared maps (MTAN's
    attention reads every stage) has none.
    """

    preds: dict[str, Tensor]
    features: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class FeatureInfo:
    """The shared encoder feature a model puts in ``features["encoder"]``: what cross-task
    methods size their mapping networks from."""

    channels: int
    reduction: int
    """Stride relative to the input (32 for SegNet, 8 for a dilated ResNet)."""
    size: Callable[[int, int], tuple[int, int]]
    """(H, W) of the input -> (h, w) of the feature (architectures round differently)."""
    stages: tuple[int, ...] = ()
    """Widths of the encoder's halving stages, when it is a plain stack of them (SegNet):
    the SegNet-style mapping network mirrors these."""


def floor_size(reduction: int) -> Callable[[int, int], tuple[int, int]]:
    """The size rule of max-pooling encoders (SegNet, MTAN): every pooling floors."""
    return lambda h, w: (h // reduction, w // reduction)


def ceil_size(reduction: int) -> Callable[[int, int], tuple[int, int]]:
    """The size rule of padded strided convolutions (ResNets): every stride rounds up."""
    return lambda h, w: (math.ceil(h / reduction), math.ceil(w / reduction))


class MultiTaskModel(nn.Module, ABC):
    """The model contract (see the module docstring)."""

    activations: dict[str, Callable[[Tensor], Tensor]]
    """Task activation per head, plain callables outside the module tree (so ``train.amp``
    can run them in fp32); a container of per-task models leaves it to its members."""

    @property
    @abstractmethod
    def tasks(self) -> list[str]:
        """Task names in head order."""

    @abstractmethod
    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters every task's loss flows through, in forward order ([] only for a model
        that shares nothing, as single-task learning)."""

    @property
    def encoder_info(self) -> FeatureInfo | None:
        """The shared encoder feature, None when there is no single shared encoder."""
        return None

    @abstractmethod
    def forward(self, x: Tensor) -> ModelOutput: ...


class PerTaskModels(MultiTaskModel):
    """Single-task learning (STL): one independent network per task, same forward contract.

    Wrapping the per-task networks behind the multi-task contract lets the STL baseline run
    through exactly the same training and evaluation code as the shared models. There is no
    shared encoder, so each net's encoder feature is exposed as ``features["encoder/<task>"]``
    and nothing is stored under ``"encoder"`` (a consumer expecting one shared map must not
    silently pick an arbitrary task's) or ``"shared"``.
    """

    def __init__(self, nets: Mapping[str, nn.Module]) -> None:
        super().__init__()
        if not nets:
            raise ValueError("PerTaskModels needs at least one per-task network")
        self.nets = nn.ModuleDict(dict(nets))

    @property
    def tasks(self) -> list[str]:
        """Task names in construction order."""
        return list(self.nets.keys())

    def shared_parameters(self) -> list[nn.Parameter]:
        """None: every task has its own network."""
        return []

    def forward(self, x: Tensor) -> ModelOutput:
        """Run every per-task net on ``x`` and merge their single predictions."""
        preds: dict[str, Tensor] = {}
        features: dict[str, Tensor] = {}
        for task, net in self.nets.items():
            out = net(x)
            if task not in out.preds:
                raise KeyError(
                    f"per-task net for {task!r} returned preds {sorted(out.preds)}, "
                    f"expected a {task!r} prediction"
                )
            preds[task] = out.preds[task]
            for name, feat in out.features.items():
                if name != "shared":  # what a member's heads read is shared with no task here
                    features[f"{name}/{task}"] = feat
        return ModelOutput(preds=preds, features=features)


def build_model(name: str, heads: Mapping[str, HeadSpec], **kwargs: object) -> nn.Module:
    """Build the registered model ``name`` with one head per entry of ``heads``."""
    return MODELS.get(name)(heads=heads, **kwargs)


def scaled(channels: int, width: float) -> int:
    """A channel count scaled by a width multiplier (rounded, at least 1)."""
    return max(1, round(channels * width))


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (works on meta-device modules, which hold no storage)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def shared_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The model's declared shared parameters (gradient weightings act on these)."""
    return list(as_multitask(model).shared_parameters())


def as_multitask(model: nn.Module) -> MultiTaskModel:
    """``model`` if it keeps the model contract, else a ConfigError saying what is missing
    (a model that forgot ``shared_parameters`` would silently turn PCGrad/MGDA into a sum)."""
    if isinstance(model, MultiTaskModel):
        return model
    raise ConfigError(f"model {type(model).__name__} does not keep the model contract: "
                      f"subclass mtpsl.models.MultiTaskModel (tasks, activations, "
                      f"shared_parameters, encoder_info)")


def check_input_size(model: nn.Module, height: int, width: int, model_name: str) -> None:
    """A ConfigError when ``height x width`` images would shrink to nothing in the model's
    encoder (SegNet's five poolings need 32 pixels a side), which torch reports only as an
    internal error from deep inside a pooling layer at the first step."""
    nets = model.nets.values() if isinstance(model, PerTaskModels) else [model]
    for net in nets:
        info = as_multitask(net).encoder_info
        if info is not None and min(info.size(height, width)) < 1:
            raise ConfigError(
                f"model.name: {model_name!r} reduces images {info.reduction}x, so its encoder "
                f"has nothing left of these {height}x{width} images: use images of at least "
                f"{info.reduction} pixels a side, or a model with a smaller reduction")


def require_encoder_info(model: nn.Module, method: str) -> FeatureInfo:
    """The model's shared encoder feature, or a ConfigError naming ``method``."""
    info = as_multitask(model).encoder_info
    if info is None:
        raise ConfigError(f"method {method} needs a model with one shared encoder feature "
                          f"(features['encoder']); {type(model).__name__} has none")
    return info
