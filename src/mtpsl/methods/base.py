"""Methods: how a batch with partial labels becomes losses.

A method owns any auxiliary networks it needs (mapping nets, discriminators) and may ask for
its own optimiser groups. It returns per-task supervised losses, which a weighting strategy
combines outside the method, plus extra terms (already weighted) that are added as they are.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn

from mtpsl.core.errors import ConfigError
from mtpsl.core.param_groups import OptimGroup
from mtpsl.core.registry import Registry
from mtpsl.data.batch import Batch
from mtpsl.models import ModelOutput
from mtpsl.tasks import Task

METHODS: Registry[type[Method]] = Registry("method")
JointMaps = tuple[Tensor, Tensor, tuple[str, str]]
"""Two joint-space maps ``[N, C, h, w]`` compared by a method, and a title for each."""


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


@dataclass
class Losses:
    tasks: dict[str, Tensor]
    """Supervised loss per task (scalar): what a weighting strategy combines."""
    extra: dict[str, Tensor] = field(default_factory=dict)
    """Extra terms (consistency, adversarial, ...), already scaled by their weight."""
    logs: dict[str, Tensor] = field(default_factory=dict)
    """Components worth logging that are already part of the terms above (never optimised)."""

    def detached(self) -> dict[str, Tensor]:
        """Every term and log entry, detached, for the per-epoch training averages."""
        terms = {**self.tasks, **self.extra, **self.logs}
        return {k: v.detach() for k, v in terms.items()}


class Method(nn.Module):
    """Base class. Subclasses set the class variables and implement :meth:`compute`."""

    n_views: ClassVar[int] = 1
    """Augmented views per training image (2 for consistency methods)."""
    per_task_networks: ClassVar[bool] = False
    """True for single-task learning: one independent network per task."""
    Options: ClassVar[type[BaseModel]] = NoOptions
    contract_options: ClassVar[Mapping[str, Any]] = {}
    """``method.options`` with which ``tests/test_registries.py`` checks this method against
    this contract: values that only shrink its own networks (their defaults are paper-sized),
    or that a required option needs; validated like a config's."""
    contract_model: ClassVar[str] = "segnet"
    """The registered model ``tests/test_registries.py`` builds (tiny) for this method: a
    method that trains one network of its own (``diffusion_mtl``) names it."""

    def __init__(self, tasks: Mapping[str, Task], options: BaseModel) -> None:
        super().__init__()
        self.tasks = dict(tasks)
        self.options = options

    def compute(self, model: nn.Module, batch: Batch) -> tuple[Losses, ModelOutput]:
        raise NotImplementedError

    def attach(self, model: nn.Module) -> None:
        """Build auxiliary networks whose shape depends on the model (called once, on CPU)."""

    def optimizer_groups(self, model: nn.Module) -> list[OptimGroup]:
        """One group holding the model and this method's own trained networks, by default:
        parameters with ``requires_grad=False`` (e.g. an EMA teacher updated in
        :meth:`after_step`) are never handed to an optimiser."""
        own = [p for p in self.parameters() if p.requires_grad]
        return [OptimGroup("main", [*model.parameters(), *own])]

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        """Hook for schedules such as a consistency-weight ramp-up."""

    def after_step(self, model: nn.Module) -> None:
        """Hook after every optimiser step, on every process (e.g. an EMA teacher follows the
        just-updated ``model``). Whatever it changes must live in this method's state dict, so
        checkpoints and resumes keep it."""

    def teacher_source(self) -> tuple[str, nn.Module] | None:
        """A trained run this method learns from (``method.options.teacher``): its run
        folder or checkpoint file, and the module (built by :meth:`attach`) its model weights
        load into. The engine loads them, verified, when a new run starts (a resumed run
        restores them with this method's state)
        (:func:`mtpsl.engine.teacher.load_teacher`); None (default): no teacher."""
        return None

    def check_sources(self, n_sources: int) -> None:
        """Refuse cross-dataset data of ``n_sources`` sources the method is not set up for
        (a ConfigError naming the option)."""

    def joint_space(self, preds: Mapping[str, Tensor], targets: Mapping[str, Tensor],
                    source: str, target: str) -> JointMaps | None:
        """The two maps the method's joint task space compares for the pair (source,
        target), deterministically (``mtpsl figures joint-space`` draws them), with their
        titles; None for methods without a joint space."""
        return None


def supervised_losses(
    tasks: Mapping[str, Task], batch: Batch, preds: Mapping[str, Tensor], view: int = 0
) -> dict[str, Tensor]:
    """Eq. 1 of paper 001: each task's loss over the images labelled for it.

    Each term is a sum over labelled images divided by the batch size, so summing the terms
    gives the mean over images of the sum of that image's labelled-task losses.
    """
    targets = batch.views[view].targets
    return {
        name: labelled_sum(task.loss(preds[name], targets[name]), batch, name)
        for name, task in tasks.items()
    }


def two_view_forward(model: nn.Module, batch: Batch
                     ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """One forward over ``cat[view0, view1]`` (BatchNorm statistics shared by both views, as
    the reference's two-view methods): view0's and view1's predictions, and view0's features."""
    n = len(batch)
    out = model(torch.cat([batch.views[0].image, batch.views[1].image]))
    preds0 = {k: v[:n] for k, v in out.preds.items()}
    preds1 = {k: v[n:] for k, v in out.preds.items()}
    return preds0, preds1, {k: v[:n] for k, v in out.features.items()}


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Switch off ``requires_grad`` of ``module``'s parameters inside the block."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def labelled_sum(per_image: Tensor, batch: Batch, task: str) -> Tensor:
    """A per-image loss ``[B]`` summed over the images labelled for ``task``, divided by the
    batch size (the reduction of :func:`supervised_losses`)."""
    mask = batch.labelled_for(task).to(per_image.dtype)
    return (per_image * mask).sum() / len(batch)


def build_method(name: str, tasks: Mapping[str, Task], options: Mapping[str, Any]) -> Method:
    cls = METHODS.get(name)
    try:
        parsed = cls.Options.model_validate(dict(options))
    except ValidationError as err:
        details = "; ".join(
            f"method.options.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()
        )
        allowed = ", ".join(cls.Options.model_fields) or "(none)"
        raise ConfigError(f"{details} (method {name!r} accepts: {allowed})") from None
    return cls(tasks, parsed)
