"""The method's and the weighting's own hooks, called by the loop through these callbacks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mtpsl.engine.callbacks.base import Callback, Trainer

if TYPE_CHECKING:
    from mtpsl.data.batch import Batch
    from mtpsl.engine.step import StepResult, TrainStep


class MethodHooks(Callback):
    """The method's epoch schedule (``on_epoch_start``: ramps, warm-ups) and what it does
    after every optimiser step (``after_step``: an EMA teacher follows the student)."""

    def on_epoch_start(self, trainer: Trainer) -> None:
        trainer.exp.method.on_epoch_start(trainer.epoch, trainer.cfg.epochs)

    def on_optimizer_step(self, trainer: Trainer, result: StepResult) -> None:
        method_after_step(trainer.step)


class WeightingHooks(Callback):
    """The weighting's second look at the batch after the step, for strategies that learn
    from the step's effect (FAMO's ``wants_losses_after_step``), and its per-epoch task means
    (DWA's ``end_epoch``)."""

    def on_optimizer_step(self, trainer: Trainer, result: StepResult) -> None:
        weighting_after_step(trainer.step, result.batch)

    def on_train_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        means = {t: row[f"train/{t}"] for t in trainer.exp.tasks if f"train/{t}" in row}
        trainer.exp.weighting.end_epoch(means)


def method_after_step(step: TrainStep) -> None:
    """The method's hook after an optimiser step (also called by the step benchmarks)."""
    step.exp.method.after_step(step.exp.model)


def weighting_after_step(step: TrainStep, batch: Batch) -> None:
    """The weighting's second pass over ``batch`` when it wants one (also called by the step
    benchmarks)."""
    weighting = step.exp.weighting
    if weighting.wants_losses_after_step:
        weighting.after_step(*step.losses_after_step(batch))
