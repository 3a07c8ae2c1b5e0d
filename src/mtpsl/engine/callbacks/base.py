"""The callback contract: named hooks the training loop calls, in the order they are listed.

A callback sees the trainer (:class:`Trainer`: the experiment, the step, the run folder, the
epoch) and may keep state of its own. Hooks, in the order the loop reaches
them::

    on_fit_start
      on_epoch_start
        on_after_backward      gradients of a micro-batch, before the optimiser step
        on_optimizer_step      right after an optimiser step (the updated weights)
        on_step_end            after every micro-batch
      on_train_epoch_end       schedules stepped, BatchNorm statistics averaged
      on_eval_end              after an evaluation (the process that evaluates)
      on_epoch_end             the epoch's row complete: log it, checkpoint
    on_stop                    a stop request ended the epoch early (before its checkpoint)
    on_exception               the fit failed
    on_fit_end                 always, however the fit ended (release what was opened)

A callback whose state must survive a resume returns it from :meth:`Callback.state_dict`
(tensors and plain containers) and takes it back in :meth:`Callback.load_state_dict`.
Callbacks observe and steer the run (log, stop, save); a change to what is learned belongs
in a method or a weighting, which the set-up signature records.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from mtpsl.core.config import TrainConfig
    from mtpsl.core.distributed import DistEnv
    from mtpsl.engine.build import Experiment
    from mtpsl.engine.step import StepResult, TrainStep

CHECK_EVERY = 10
"""Optimiser steps between host-side checks that need a device sync or a collective
(divergence flags, an agreed stop under torchrun); the epoch's last step is always checked."""


class Trainer(Protocol):
    """What a callback sees of :class:`mtpsl.engine.trainer.Trainer` (a protocol, so that
    callbacks need not import the loop that imports them)."""

    exp: Experiment
    step: TrainStep
    """The training step: optimisers (``step.optim``), gradient scaler, trained parameters."""
    cfg: TrainConfig
    env: DistEnv
    device: torch.device
    run_dir: Path
    epoch: int
    """The current epoch, 0-based."""
    first_step: int
    """The epoch's first step in this session (a resumed epoch starts later)."""
    sums: dict[str, Tensor]
    """The epoch's running sums of every loss term, on the device."""
    stop_reason: str | None
    saved_epoch: int | None
    """Whole epochs in the run folder's checkpoint (None: none written yet)."""

    @property
    def steps_in_epoch(self) -> int: ...

    def request_stop(self, reason: str) -> None:
        """Stop like a preempted job: checkpoint, exit status 75, resumable."""

    def state_dict(self, epoch: int, steps: int = 0) -> dict[str, Any]:
        """The checkpoint after ``epoch`` epochs and ``steps`` steps of the next one."""


class Callback:
    """Base class: every hook is a no-op."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first step of this session (after a resume's state is loaded)."""

    def on_epoch_start(self, trainer: Trainer) -> None:
        """Before the first step of ``trainer.epoch`` (a resumed epoch: its next step)."""

    def on_after_backward(self, trainer: Trainer, result: StepResult) -> None:
        """A micro-batch's gradients are in ``.grad`` (averaged over processes and unscaled
        when ``result.updates``); the optimiser has not stepped."""

    def on_optimizer_step(self, trainer: Trainer, result: StepResult) -> None:
        """The optimisers stepped after ``result``'s micro-batch."""

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        """``result``'s micro-batch is done (``trainer.sums`` includes its terms)."""

    def on_train_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        """The epoch's steps are done: ``row`` holds ``epoch``, ``train/<term>`` means over
        processes and ``lr``; the schedules have stepped and BatchNorm statistics are
        averaged over processes."""

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """An evaluation ran (on the process that evaluates); ``metrics`` are prefixed by
        split (``eval/...``, ``val/...``)."""

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        """The epoch's row is complete (train, evaluation): log it, checkpoint."""

    def on_stop(self, trainer: Trainer, steps: int) -> None:
        """A stop request ended ``trainer.epoch`` after ``steps`` of its steps; the loop
        raises :class:`~mtpsl.core.errors.Preempted` once every callback has run."""

    def on_exception(self, trainer: Trainer, error: BaseException) -> None:
        """The fit raised ``error`` (after which ``on_fit_end`` still runs)."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """The fit is over, however it ended."""

    def state_dict(self) -> dict[str, Any]:
        """State a resumed run needs (empty: none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` returned."""


class CallbackList:
    """Calls each hook on every callback in order."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def __iter__(self) -> Iterator[Callback]:
        return iter(self.callbacks)

    def on_fit_start(self, trainer: Trainer) -> None:
        for cb in self.callbacks:
            cb.on_fit_start(trainer)

    def on_epoch_start(self, trainer: Trainer) -> None:
        for cb in self.callbacks:
            cb.on_epoch_start(trainer)

    def on_after_backward(self, trainer: Trainer, result: StepResult) -> None:
        for cb in self.callbacks:
            cb.on_after_backward(trainer, result)

    def on_optimizer_step(self, trainer: Trainer, result: StepResult) -> None:
        for cb in self.callbacks:
            cb.on_optimizer_step(trainer, result)

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        for cb in self.callbacks:
            cb.on_step_end(trainer, result)

    def on_train_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_train_epoch_end(trainer, row)

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_eval_end(trainer, metrics)

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_epoch_end(trainer, row)

    def on_stop(self, trainer: Trainer, steps: int) -> None:
        for cb in self.callbacks:
            cb.on_stop(trainer, steps)

    def on_exception(self, trainer: Trainer, error: BaseException) -> None:
        for cb in self.callbacks:
            cb.on_exception(trainer, error)

    def on_fit_end(self, trainer: Trainer) -> None:
        """Every callback's, even when one of them fails (the first failure is raised)."""
        failure: BaseException | None = None
        for cb in self.callbacks:
            try:
                cb.on_fit_end(trainer)
            except BaseException as err:  # re-raised after the others ran
                failure = failure or err
        if failure is not None:
            raise failure

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """The state of every callback that has some, keyed by its class."""
        return {key: state for key, cb in self._keyed() if (state := cb.state_dict())}

    def load_state_dict(self, state: dict[str, dict[str, Any]]) -> None:
        for key, cb in self._keyed():
            if key in state:
                cb.load_state_dict(state[key])

    def _keyed(self) -> Iterator[tuple[str, Callback]]:
        """Each callback under its class's qualified name (``#2``, ``#3``... for repeats), so
        adding another callback does not move the state of the others."""
        seen: dict[str, int] = {}
        for cb in self.callbacks:
            name = f"{type(cb).__module__}.{type(cb).__qualname__}"
            seen[name] = seen.get(name, 0) + 1
            yield (name if seen[name] == 1 else f"{name}#{seen[name]}"), cb
