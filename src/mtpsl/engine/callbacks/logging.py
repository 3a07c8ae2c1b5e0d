"""What a run shows and records as it trains: ``metrics.jsonl``, the logging backends of
``log.backends`` (``metrics.csv``, TensorBoard, W&B, MLflow), and the console's progress bar
and per-epoch line."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mtpsl.core.signature import flatten
from mtpsl.engine.callbacks.base import CHECK_EVERY, Callback, Trainer
from mtpsl.engine.callbacks.loggers import LogContext, RunLogger, open_logger, without_epoch
from mtpsl.engine.history import History
from mtpsl.tasks.scoring import primary_keys

if TYPE_CHECKING:
    from tqdm.auto import tqdm

    from mtpsl.engine.step import StepResult
    from mtpsl.tasks import Task


class MetricsFiles(Callback):
    """Each epoch's row into ``metrics.jsonl`` (:class:`History`: the run's own record, which
    ``report``, ``compare`` and a resume read)."""

    def __init__(self, history: History) -> None:
        self.history = history

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        self.history.append(row)


class Loggers(Callback):
    """The backends of ``log.backends`` (:mod:`~mtpsl.engine.callbacks.loggers`): the
    hyperparameters once per record, each epoch's row, closed however the fit ends. A record
    that starts afresh on a resumed run (TensorBoard, CSV, or a W&B/MLflow run the checkpoint
    does not name) gets the hyperparameters and the epochs the checkpoint kept; one that
    continues (the recorded W&B/MLflow run id) gets neither again."""

    def __init__(self, history: History) -> None:
        self.history = history
        self.loggers: list[RunLogger] = []
        self.saved: dict[str, dict[str, Any]] = {}
        """The backends' states from the checkpoint a resumed run started from."""

    def on_fit_start(self, trainer: Trainer) -> None:
        config = trainer.exp.config
        params = flatten(config.model_dump())
        primary = [f"eval/{k}" for k in primary_keys(trainer.exp.tasks)]
        for name in config.log.backends:
            ctx = LogContext(trainer.run_dir, config.name, config.log, self.saved.get(name),
                             primary)
            try:
                logger = open_logger(name, ctx)
            except BaseException:
                self._close(failed=True)
                raise
            self.loggers.append(logger)
            if not logger.continues:
                logger.log_hparams(params)
                logger.replay(self.history.rows)

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_metrics(row["epoch"], without_epoch(row))

    def on_exception(self, trainer: Trainer, error: BaseException) -> None:
        self._close(failed=True)

    def on_stop(self, trainer: Trainer, steps: int) -> None:
        self._close(failed=True)

    def on_fit_end(self, trainer: Trainer) -> None:
        self._close(failed=False)

    def state_dict(self) -> dict[str, Any]:
        return {logger.name: state for logger in self.loggers if (state := logger.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved = dict(state)

    def _close(self, failed: bool) -> None:
        loggers, self.loggers = self.loggers, []
        for logger in loggers:
            logger.close(failed)


class Console(Callback):
    """A tqdm bar over the epoch's steps when stderr is a terminal (``train.progress``), and
    one line per epoch that stays on screen: loss, the primary metrics when evaluated,
    throughput and the ETA over the epochs trained in this session."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.began = 0.0
        self.clock: list[float] = []
        """Seconds of each epoch trained in this session (the ETA's basis)."""

    def on_epoch_start(self, trainer: Trainer) -> None:
        from tqdm.auto import tqdm

        self.began = time.perf_counter()
        self.bar = tqdm(total=trainer.steps_in_epoch, initial=trainer.first_step,
                        desc=f"epoch {trainer.epoch + 1}/{trainer.cfg.epochs}", leave=False,
                        disable=None if trainer.cfg.progress else True)  # None: a terminal only

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        assert self.bar is not None
        self.bar.update()
        if trainer.cfg.progress and (result.index % CHECK_EVERY == 0 or result.last):
            self.bar.set_postfix(loss=f"{trainer.sums['total'].item() / (result.index + 1):.4f}")

    def on_train_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        self._close()

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        seconds = time.perf_counter() - self.began
        images = (trainer.steps_in_epoch - trainer.first_step) * trainer.cfg.batch_size
        self.clock.append(seconds)
        epochs_left = trainer.cfg.epochs - row["epoch"]
        eta = sum(self.clock) / len(self.clock) * epochs_left
        print(epoch_line(row, trainer.cfg.epochs, images * trainer.env.world / seconds, eta,
                         trainer.exp.tasks), file=sys.stderr, flush=True)

    def on_stop(self, trainer: Trainer, steps: int) -> None:
        self._close()

    def on_exception(self, trainer: Trainer, error: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def epoch_line(row: Mapping[str, Any], epochs: int, images_per_s: float, eta_s: float,
               tasks: Mapping[str, Task]) -> str:
    """``epoch 3/10  loss 1.234 (semantic 0.5, ...)  eval semantic/miou 0.41 ...  96 img/s
    ETA 1m20s``: one line per epoch that stays on screen (train, compare, make demo)."""
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row.get('train/total', math.nan):.4f}"]
    losses = [f"{t} {row[f'train/{t}']:.3f}" for t in tasks if f"train/{t}" in row]
    if losses:
        parts[-1] += f" ({', '.join(losses)})"
    shown = [f"{k} {row[f'eval/{k}']:.4g}" for k in primary_keys(tasks) if f"eval/{k}" in row]
    if shown:
        parts.append("eval " + ", ".join(shown))
    minutes, seconds = divmod(round(eta_s), 60)
    parts += [f"{images_per_s:.1f} img/s", f"ETA {minutes}m{seconds:02d}s"]
    return "  ".join(parts)
