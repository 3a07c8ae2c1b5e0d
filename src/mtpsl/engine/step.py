"""One training step: the method's losses under autocast, the weighting's backward pass, and
the optimiser update, with what each needs built once by :func:`prepare_training`.

The step is split where the loop hands over to callbacks: :meth:`TrainStep.forward_backward`
(gradients of one micro-batch), :meth:`TrainStep.reduce_gradients` (average over processes,
fp16 unscale), then callbacks inspect the gradients (divergence watch), then
:meth:`TrainStep.update` (clip, optimiser step), then callbacks that act on the updated
weights (an EMA teacher, a weighting's second pass via :meth:`TrainStep.losses_after_step`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mtpsl.core import distributed as ddp
from mtpsl.core.distributed import DistEnv
from mtpsl.core.errors import ConfigError
from mtpsl.data.batch import Batch
from mtpsl.engine.build import Experiment
from mtpsl.engine.optim import Optimisation
from mtpsl.engine.speed import (
    autocast,
    check_options,
    grad_scaler,
    optimizer_extra,
    prepare_aux,
    prepare_model,
)
from mtpsl.methods.base import Losses
from mtpsl.models import ModelOutput, shared_parameters
from mtpsl.weighting import GradientContext
from mtpsl.weighting.gramian import SharedGramian


@dataclass(frozen=True)
class StepResult:
    """One micro-batch's step as callbacks see it."""

    index: int
    """Micro-batch index within the epoch (0-based)."""
    steps: int
    """Micro-batches in the epoch."""
    terms: dict[str, Tensor]
    """Detached loss terms on the device: ``total`` (what was backpropagated, before the
    micro-batch division) and every task and extra term of the method."""
    batch: Batch
    updates: bool
    """This micro-batch ends an optimiser step (always, without ``train.accumulate``)."""

    @property
    def last(self) -> bool:
        return self.index == self.steps - 1


@dataclass(frozen=True)
class MicroBatch:
    """Where micro-batch ``index`` sits in its accumulation group of ``train.accumulate``."""

    first: bool
    """It starts a new gradient."""
    size: int
    """Micro-batches in its group (the epoch's last group may be shorter)."""
    last: bool
    """It ends the group: the optimiser steps after it."""

    @classmethod
    def at(cls, index: int, steps: int, accumulate: int) -> MicroBatch:
        start = index - index % accumulate
        size = min(accumulate, steps - start)
        return cls(index == start, size, index == start + size - 1)


class TrainStep:
    """The training step of an experiment on one device (and process)."""

    def __init__(self, exp: Experiment, optim: Optimisation, device: torch.device,
                 env: DistEnv, scaler: torch.amp.GradScaler | None = None,
                 gramian: SharedGramian | None = None) -> None:
        self.exp, self.optim, self.device, self.env = exp, optim, device, env
        self.scaler, self.gramian = scaler, gramian
        self.params = [p for opt in optim.optimizers for g in opt.param_groups
                       for p in g["params"]]
        """Every trained parameter (the model's, the method's, the weighting's)."""
        self.shared = shared_parameters(exp.model)

    def forward_backward(self, batch: Batch, zero: bool = True,
                         divisor: int = 1) -> dict[str, Tensor]:
        """Losses under autocast (kept in fp32: see :mod:`mtpsl.engine.speed`), then the
        weighting's backward; returns the detached terms.

        ``zero`` starts a new gradient (the first micro-batch of an optimiser step);
        ``divisor`` (the step's number of micro-batches) divides what is backpropagated, not
        what is logged. With fp16 the losses handed to the weighting are multiplied by the
        loss scale (exact for the linear weightings fp16 is allowed with) and the logged total
        is divided back.
        """
        exp = self.exp
        with autocast(exp.config.train.amp, self.device):
            losses, out = exp.method.compute(exp.model, batch)
        if zero:
            self.optim.zero_grad()
        task_losses = {k: v.float() for k, v in losses.tasks.items()}
        extra = sum((v.float() for v in losses.extra.values()),
                    torch.zeros((), device=self.device))
        context = self.gradient_context(out, ddp.any_over_ranks(batch.labelled.any(0)))
        if divisor == 1 and self.scaler is None:
            total = exp.weighting.backward(task_losses, extra, context)
            return {"total": total, **losses.detached()}
        scale = torch.ones((), device=self.device) / divisor
        if self.scaler is not None:
            scale = self.scaler.scale(scale)  # no host sync
        scaled = {k: v * scale for k, v in task_losses.items()}
        total = exp.weighting.backward(scaled, extra * scale, context) / scale
        return {"total": total, **losses.detached()}

    def gradient_context(self, out: ModelOutput, present: Tensor) -> GradientContext:
        """What the weighting differentiates besides the losses
        (``method.weighting_gradients``): the shared representation, the Gram engine, or
        the shared parameters alone. ``present`` is the same on every process."""
        gradients = self.exp.weighting.gradients
        if gradients == "gramian":
            return GradientContext(present, self.shared, gramian=self.gramian)
        if gradients != "representation":
            return GradientContext(present, self.shared)
        z = out.features.get("shared")
        if z is None or not z.requires_grad:
            raise ConfigError(
                f"method.weighting_gradients: 'representation' needs a model whose heads all "
                f"read one shared map (features['shared']: segnet, dense/resnet); "
                f"{type(self.exp.model).__name__} has none (use 'parameters')")
        return GradientContext(present, self.shared, representation=z)

    def reduce_gradients(self) -> None:
        """Average the gradients over processes (so every process checks and applies the
        same ones) and divide out the fp16 loss scale."""
        ddp.allreduce_gradients(self.params, self.env)
        self.optim.unscale(self.scaler)

    def gradients(self) -> list[Tensor]:
        """The gradients a divergence check may read: none under fp16, whose GradScaler skips
        the steps that overflow instead."""
        if self.scaler is not None:
            return []
        return [p.grad for p in self.params if p.grad is not None]

    def update(self) -> None:
        """Clip (``train.clip_norm``, on the unscaled, averaged gradients of every group),
        then one step of every optimiser."""
        clip = self.exp.config.train.clip_norm
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, clip)
        self.optim.step(self.scaler)

    def losses_after_step(self, batch: Batch) -> tuple[dict[str, Tensor], Tensor]:
        """The batch's task losses with the updated weights, and which tasks are present (for
        strategies that learn from the step's effect): no gradient, and the model's and the
        method's buffers (BatchNorm statistics) restored, so the extra pass changes nothing
        else."""
        exp = self.exp
        buffers = [*exp.model.buffers(), *exp.method.buffers()]
        saved = [b.detach().clone() for b in buffers]
        losses: Losses
        with torch.no_grad(), autocast(exp.config.train.amp, self.device):
            losses, _ = exp.method.compute(exp.model, batch)
        with torch.no_grad():
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)
        present = ddp.any_over_ranks(batch.labelled.any(0))
        return {k: v.float() for k, v in losses.tasks.items()}, present


def build_optimisation(exp: Experiment, defaults: dict | None = None) -> Optimisation:
    """The method's groups, the weighting's own groups, and its other parameters in "main"."""
    groups = exp.method.optimizer_groups(exp.model)
    own = exp.weighting.optimizer_groups()
    owned = {id(p) for g in own for p in g.params}
    main = next((g for g in groups if g.name == "main"), None)
    if main is None:
        raise ConfigError(f"method {exp.config.method.name}: optimizer_groups() names no "
                          f"'main' group (the weighting's parameters join it)")
    main.params.extend(p for p in exp.weighting.trained_parameters() if id(p) not in owned)
    cfg = exp.config
    return Optimisation.build([*groups, *own], cfg.optim, cfg.train.epochs, defaults)


def prepare_training(exp: Experiment, env: DistEnv, device: torch.device) -> TrainStep:
    """Modules placed and sped up, optimisers, and the weighting's Gram engine: what the loop
    (and a benchmark of its step) needs before the first batch."""
    setup_modules(exp, env, device)
    optim = build_optimisation(exp, optimizer_extra(exp.config.train, device))
    return TrainStep(exp, optim, device, env, grad_scaler(exp.config.train, device),
                     gramian_engine(exp, env))


def setup_modules(exp: Experiment, env: DistEnv, device: torch.device) -> None:
    """Sync BN, device placement and the speed options, in that order."""
    cfg = exp.config.train
    check_options(exp.config, device, exp.weighting)
    if cfg.sync_bn and env.enabled:
        exp.model = ddp.convert_sync_bn(exp.model, device)
    exp.model.to(device)
    modules: list[nn.Module] = [exp.method, exp.weighting]
    for module in modules:
        module.to(device)
    prepare_model(exp.model, cfg)
    prepare_aux(modules, cfg)


def gramian_engine(exp: Experiment, env: DistEnv) -> SharedGramian | None:
    """The Gram engine on the shared layers when the weighting asks for it (after the model's
    set-up: the engine hooks the modules the forward pass will run)."""
    if exp.weighting.gradients != "gramian":
        return None
    if env.enabled:
        raise ConfigError("method.weighting_gradients: 'gramian' gives one process's Gram "
                          "matrix; under torchrun use 'parameters' or 'representation'")
    if exp.config.train.compile:
        raise ConfigError("method.weighting_gradients: 'gramian' hooks the shared layers, "
                          "which train.compile does not support: set train.compile=false")
    shared = shared_parameters(exp.model)
    if not shared:
        raise ConfigError(f"method.weighting_gradients: 'gramian' needs shared parameters; "
                          f"{type(exp.model).__name__} has none")
    return SharedGramian(exp.model, shared)
