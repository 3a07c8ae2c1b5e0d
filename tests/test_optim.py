"""Optimiser groups and schedules (mtpsl.engine.optim)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtpsl.core.config import OptimConfig
from mtpsl.core.param_groups import OptimGroup
from mtpsl.engine.optim import Optimisation


def _optimisation(epochs: int, **cfg) -> tuple[Optimisation, nn.Parameter]:
    weight = nn.Parameter(torch.ones(2))
    config = OptimConfig(lr=0.1, **cfg)
    return Optimisation.build([OptimGroup("main", [weight])], config, epochs), weight


def test_poly_schedule_follows_its_formula():
    optim, _ = _optimisation(4, schedule="poly", poly_power=0.9)
    seen = []
    for _ in range(4):
        seen.append(optim.optimizers[0].param_groups[0]["lr"])
        optim.end_epoch()
    assert seen == pytest.approx([0.1 * (1 - e / 4) ** 0.9 for e in range(4)])


def test_resume_with_more_epochs_recomputes_the_poly_rate():
    """The saved rate belongs to the old schedule: a resume that extends train.epochs must
    continue on the new one, exactly where an uninterrupted run with those epochs would be."""
    short, _ = _optimisation(1, schedule="poly")
    short.end_epoch()  # the 1-epoch schedule ends at lr 0
    assert short.optimizers[0].param_groups[0]["lr"] == 0.0
    longer, _ = _optimisation(2, schedule="poly")
    longer.load_state_dict(short.state_dict())
    reference, _ = _optimisation(2, schedule="poly")
    reference.end_epoch()
    assert longer.optimizers[0].param_groups[0]["lr"] == pytest.approx(
        reference.optimizers[0].param_groups[0]["lr"]
    )
    assert longer.schedulers[0].get_last_lr() == reference.schedulers[0].get_last_lr()


def test_group_overrides_take_precedence_over_the_config():
    weight = nn.Parameter(torch.ones(2))
    group = OptimGroup("disc", [weight], lr=0.5, optimizer="adam", betas=(0.9, 0.99))
    optim = Optimisation.build([group], OptimConfig(optimizer="sgd", lr=0.1), epochs=3)
    opt = optim.optimizers[0]
    assert isinstance(opt, torch.optim.Adam)
    assert opt.param_groups[0]["lr"] == 0.5
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)


def test_sgd_uses_the_configured_momentum_and_empty_groups_are_dropped():
    weight = nn.Parameter(torch.ones(2))
    groups = [OptimGroup("main", [weight]), OptimGroup("empty", [])]
    optim = Optimisation.build(groups, OptimConfig(optimizer="sgd", momentum=0.8), epochs=3)
    assert len(optim.optimizers) == 1
    assert optim.optimizers[0].param_groups[0]["momentum"] == 0.8
