"""SIGTERM/SIGUSR1 (what cluster schedulers send before they stop a job) become a clean stop:
a checkpoint at the next step boundary and exit status 75, resumable."""

from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING, Any

import torch

from mtpsl.engine.callbacks.base import CHECK_EVERY, Callback, Trainer

if TYPE_CHECKING:
    from mtpsl.engine.step import StepResult

STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1") if hasattr(signal, n))
"""What cluster schedulers send before they stop a job (SLURM, Kubernetes)."""


class Preemption(Callback):
    """The signal handler only sets a flag; after an optimiser step that is not the epoch's
    last, the callback asks the trainer to stop, and the loop writes a mid-epoch checkpoint and
    raises :class:`~mtpsl.core.errors.Preempted`. A signal that arrives later in an epoch
    stops it after its checkpoint. Under torchrun the flag is agreed over processes every
    :data:`CHECK_EVERY` optimiser steps and at every epoch's end, so all of them stop at the
    same step, also when the signal reached only some of them (or at different moments).
    Handlers are installed only from the main thread (Python's rule) and restored when the
    fit ends (unless replaced meanwhile: a lost peer's report ignores SIGTERM)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def on_fit_start(self, trainer: Trainer) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def on_fit_end(self, trainer: Trainer) -> None:
        for sig, handler in self._previous.items():
            if signal.getsignal(sig) == self._handle:  # not one set since (a lost peer's)
                signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        self.signal = signum

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if (result.updates and not result.last
                and self.requested(trainer, result.index // trainer.cfg.accumulate)):
            trainer.request_stop(self.name())

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        # agreed under torchrun: a signal that reached one process after the epoch's last
        # check would otherwise stop it alone, and the others would wait for it in vain
        if self.requested(trainer, 0):
            trainer.request_stop(self.name())

    def requested(self, trainer: Trainer, step: int) -> bool:
        """Whether to stop after optimiser step ``step`` of the epoch (agreed under torchrun
        every ``CHECK_EVERY`` optimiser steps)."""
        if not trainer.env.enabled:
            return self.signal is not None
        if step % CHECK_EVERY:
            return False
        flag = torch.tensor([float(self.signal is not None)], device=trainer.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def name(self) -> str:
        # under torchrun a process may stop because another one received the signal
        return signal.Signals(self.signal).name if self.signal else "a signal to another process"
