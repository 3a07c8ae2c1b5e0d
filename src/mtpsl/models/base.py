"""Model contract shared by every architecture: heads in, activated predictions out.

Methods (the training recipes) only ever see :class:`ModelOutput`, so any network that
maps an image to ``ModelOutput`` can be swapped in by registry name without touching them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

from mtpsl.registry import Registry

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


@dataclass
class ModelOutput:
    """Forward result of every model.

    ``preds`` holds activated per-task predictions at input resolution. ``features`` holds
    named intermediate maps; ``"encoder"`` is the shared encoder's last pooled map, which
    cross-task consistency methods (e.g. MTPSL's mapping network) consume.
    """

    preds: dict[str, Tensor]
    features: dict[str, Tensor] = field(default_factory=dict)


class PerTaskModels(nn.Module):
    """Single-task learning (STL): one independent network per task, same forward contract.

    Wrapping the per-task networks behind the multi-task contract lets the STL baseline run
    through exactly the same training and evaluation code as the shared models. There is no
    shared encoder, so each net's encoder feature is exposed as ``features["encoder/<task>"]``
    and nothing is stored under ``"encoder"`` (a consumer expecting one shared map must not
    silently pick an arbitrary task's).
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

    def forward(self, x: Tensor) -> ModelOutput:
        """Run every per-task net on ``x`` and merge their single predictions."""
        preds: dict[str, Tensor] = {}
        features: dict[str, Tensor] = {}
        for task, net in self.nets.items():
            out: ModelOutput = net(x)
            if task not in out.preds:
                raise KeyError(
                    f"per-task net for {task!r} returned preds {sorted(out.preds)}, "
                    f"expected a {task!r} prediction"
                )
            preds[task] = out.preds[task]
            for name, feat in out.features.items():
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
    """Parameters every task's loss flows through, in forward order ([] if none are shared).

    Gradient-based weighting strategies (GradNorm, MGDA, PCGrad, CAGrad) act on these; a
    model offers them by defining ``shared_parameters()``.
    """
    method = getattr(model, "shared_parameters", None)
    return list(method()) if callable(method) else []
