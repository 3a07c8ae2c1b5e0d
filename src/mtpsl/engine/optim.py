"""Optimisers and their schedules, built from the groups that methods and weightings declare.

Methods (and weighting strategies) say which parameters need their own optimiser or learning
rate as :class:`~mtpsl.core.param_groups.OptimGroup` s; :class:`Optimisation` builds one
optimiser + scheduler per group from ``optim.*`` of the config, with the group's own overrides
on top. Schedules step per epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.optim import SGD, Adam
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, StepLR

from mtpsl.core.config import OptimConfig
from mtpsl.core.param_groups import OptimGroup


def _pick(value, default):
    return default if value is None else value


def build_optimizer(
    group: OptimGroup, cfg: OptimConfig, defaults: dict | None = None
) -> torch.optim.Optimizer:
    """The group's optimiser; ``defaults`` (e.g. ``{"fused": True}`` on CUDA) are extra
    keyword arguments that the group's own ``extra`` overrides."""
    lr = _pick(group.lr, cfg.lr)
    decay = _pick(group.weight_decay, cfg.weight_decay)
    extra = {**(defaults or {}), **group.extra}
    if _pick(group.optimizer, cfg.optimizer) == "sgd":
        return SGD(group.params, lr=lr, momentum=cfg.momentum, weight_decay=decay, **extra)
    betas = _pick(group.betas, cfg.betas)
    return Adam(group.params, lr=lr, betas=betas, weight_decay=decay, **extra)


def build_scheduler(
    opt: torch.optim.Optimizer, group: OptimGroup, cfg: OptimConfig, epochs: int
) -> LRScheduler:
    if _pick(group.schedule, cfg.schedule) == "poly":
        power = cfg.poly_power
        return LambdaLR(opt, lambda e: max(0.0, 1.0 - e / epochs) ** power)
    return StepLR(opt, _pick(group.step_size, cfg.step_size), _pick(group.gamma, cfg.gamma))


@dataclass
class Optimisation:
    """One optimiser + per-epoch scheduler per group (XTC uses two, adversarial methods more)."""

    optimizers: list[torch.optim.Optimizer]
    schedulers: list[LRScheduler]

    @classmethod
    def build(
        cls, groups: list[OptimGroup], cfg: OptimConfig, epochs: int, defaults: dict | None = None
    ) -> Optimisation:
        groups = [g for g in groups if g.params]
        optimizers = [build_optimizer(g, cfg, defaults) for g in groups]
        pairs = zip(optimizers, groups, strict=True)
        schedulers = [build_scheduler(o, g, cfg, epochs) for o, g in pairs]
        return cls(optimizers, schedulers)

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self, scaler: torch.amp.GradScaler | None = None) -> None:
        """One step of every optimiser; with an fp16 ``scaler``, steps holding inf/NaN
        gradients are skipped and the loss scale is updated."""
        for opt in self.optimizers:
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
        if scaler is not None:
            scaler.update()

    def unscale(self, scaler: torch.amp.GradScaler | None) -> None:
        """Divide the gradients by the fp16 loss scale (before clipping or inspecting them)."""
        if scaler is not None:
            for opt in self.optimizers:
                scaler.unscale_(opt)

    def end_epoch(self) -> None:
        for sched in self.schedulers:
            sched.step()

    def state_dict(self) -> dict:
        return {
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
        }

    def load_state_dict(self, state: dict) -> None:
        for o, s in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)
        for sched, s in zip(self.schedulers, state["schedulers"], strict=True):
            sched.load_state_dict(s)
            if isinstance(sched, LambdaLR):
                # A poly schedule depends on train.epochs, which a resume may extend: the
                # saved learning rate belongs to the old schedule, so recompute it.
                for group, lr in zip(sched.optimizer.param_groups, sched.get_lr(), strict=True):
                    group["lr"] = lr
                sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]
