"""Callbacks of the training loop (:class:`~mtpsl.engine.trainer.Trainer`).

Every run gets :func:`default_callbacks`, in this order: the method's and the weighting's
hooks, the divergence watch, preemption, then callbacks of one's own (``train.callbacks`` in
the config as ``package.module:Class`` with options, or ``callbacks=`` of
:func:`mtpsl.engine.run.train` from Python), then, on the process that writes the run
folder, ``metrics.jsonl``, the logging backends of ``log.backends`` (``metrics.csv``,
TensorBoard, W&B, MLflow: :mod:`~mtpsl.engine.callbacks.loggers`), the console and the
checkpoint.
"""

from collections.abc import Sequence

from mtpsl.engine.callbacks.base import CHECK_EVERY, Callback, CallbackList
from mtpsl.engine.callbacks.checkpointing import Checkpointing
from mtpsl.engine.callbacks.divergence import DivergenceWatch, NonFiniteLossError
from mtpsl.engine.callbacks.hooks import MethodHooks, WeightingHooks
from mtpsl.engine.callbacks.loggers import RunLogger
from mtpsl.engine.callbacks.logging import Console, Loggers, MetricsFiles, epoch_line
from mtpsl.engine.callbacks.preemption import Preemption
from mtpsl.engine.callbacks.user import build_callbacks
from mtpsl.engine.history import History


def default_callbacks(history: History, writes_files: bool,
                      extra: Sequence[Callback] = ()) -> list[Callback]:
    """The callbacks of a run, in order: the built-in hooks, ``extra`` (the config's and the
    caller's own, so their changes to an epoch's row are logged and a stop they request is
    checkpointed), then on the process that writes the run folder (rank 0 under torchrun)
    the files and the console."""
    callbacks: list[Callback] = [MethodHooks(), WeightingHooks(), DivergenceWatch(),
                                 Preemption(), *extra]
    if writes_files:
        callbacks += [MetricsFiles(history), Loggers(history), Console(), Checkpointing()]
    return callbacks


__all__ = [
    "CHECK_EVERY",
    "Callback",
    "CallbackList",
    "Checkpointing",
    "Console",
    "DivergenceWatch",
    "Loggers",
    "MethodHooks",
    "MetricsFiles",
    "NonFiniteLossError",
    "Preemption",
    "RunLogger",
    "WeightingHooks",
    "build_callbacks",
    "default_callbacks",
    "epoch_line",
]
