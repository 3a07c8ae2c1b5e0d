"""The run's checkpoint, written atomically and verified (:mod:`mtpsl.engine.checkpoint`):
every ``train.checkpoint_every`` epochs, after the last one, and when a stop is requested
(at an epoch's end, or mid-epoch with the loss sums of the steps done)."""

from __future__ import annotations

from typing import Any

from mtpsl.core.faults import fault_point
from mtpsl.engine.callbacks.base import Callback, Trainer
from mtpsl.engine.checkpoint import CHECKPOINT, save_checkpoint


class Checkpointing(Callback):
    """Writes ``RUN/checkpoint.pt``; the previous one stays intact until the new one is
    complete. Runs after the callbacks that log the epoch (so the files describe at least the
    checkpoint's epochs) and after the divergence watch (no non-finite weight is saved)."""

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        done = row["epoch"]
        fault_point("epoch")  # the epoch is logged, its checkpoint not yet written
        every, epochs = trainer.cfg.checkpoint_every, trainer.cfg.epochs
        if done % every == 0 or done == epochs or trainer.stop_reason is not None:
            save_checkpoint(trainer.state_dict(done), trainer.run_dir / CHECKPOINT)
            trainer.saved_epoch = done

    def on_stop(self, trainer: Trainer, steps: int) -> None:
        save_checkpoint(trainer.state_dict(trainer.epoch, steps), trainer.run_dir / CHECKPOINT)
