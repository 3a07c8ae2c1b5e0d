"""The contract by which methods and weighting strategies ask for optimisers.

A plugin returns :class:`OptimGroup` s (parameters plus the settings they need of their own);
the engine (:mod:`mtpsl.engine.optim`) turns each into an optimiser and a schedule. Kept in the
core so plugins can declare groups without importing the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from torch import nn


@dataclass
class OptimGroup:
    """Parameters with their own optimiser and schedule; None fields take the config's value."""

    name: str
    params: list[nn.Parameter]
    lr: float | None = None
    step_size: int | None = None
    gamma: float | None = None
    optimizer: Literal["adam", "sgd"] | None = None
    betas: tuple[float, float] | None = None
    schedule: Literal["step", "poly"] | None = None
    weight_decay: float | None = None
    extra: dict = field(default_factory=dict)
    """Further optimiser keyword arguments (e.g. ``{"fused": True}``)."""
