"""Logging backends behind one small interface (:class:`RunLogger`): the run's hyperparameters
once, then one row of metrics per epoch, then close. ``log.backends`` names them:
``tensorboard`` and ``csv`` (the default, written into the run folder), ``wandb`` (Weights &
Biases) and ``mlflow``, each imported only when named.

On a resumed run, a backend whose files live in the run folder (TensorBoard, CSV) rewrites its
record from the epochs the checkpoint kept, hyperparameters included, so no point is there
twice; W&B and MLflow continue the run id the checkpoint recorded and get neither again. Each
record thus holds the hyperparameters exactly once: W&B's and MLflow's those the run started
with, the rewritten ones those of the latest session (whose ``train.*`` may differ).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mtpsl.core.errors import ConfigError
from mtpsl.core.files import write_text
from mtpsl.core.names import missing_backend

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient
    from torch.utils.tensorboard import SummaryWriter

    from mtpsl.core.config import LogConfig

Row = Mapping[str, Any]
"""One epoch's metrics, keyed ``train/total``, ``eval/semantic/miou``, ``lr``..."""


@dataclass
class LogContext:
    """What a backend is opened with."""

    run_dir: Path
    name: str
    """The run's name (``name`` of the config): the W&B and MLflow run name."""
    log: LogConfig
    state: dict[str, Any] | None = None
    """What the backend returned from :meth:`RunLogger.state_dict` when the run's checkpoint
    was written (its run id); None for a new run or one checkpointed without it."""
    primary: Sequence[str] = field(default_factory=list)
    """The reported metrics' keys (``eval/semantic/miou``...): TensorBoard's HParams columns."""


class RunLogger:
    """One logging backend. :meth:`log_hparams` is called once per record it keeps, before
    any :meth:`log_metrics`; :meth:`close` ends it (also after a failure)."""

    name: ClassVar[str]
    continues: bool = False
    """Whether it continues the record of the run's earlier sessions (set when it opens)."""

    def log_hparams(self, params: Mapping[str, Any]) -> None:
        """The flattened resolved config (``model.width``: 0.25...)."""

    def log_metrics(self, step: int, metrics: Row) -> None:
        """One epoch's metrics; ``step`` is the epoch (1-based)."""

    def replay(self, rows: Iterable[Row]) -> None:
        """Earlier epochs' rows (with their ``epoch``) into a record that starts afresh."""
        for row in rows:
            self.log_metrics(row["epoch"], without_epoch(row))

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue this record (empty: it starts afresh)."""
        return {}

    def close(self, failed: bool = False) -> None:
        """End the record; ``failed``: the run stopped on an error or a preemption."""


def without_epoch(row: Row) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "epoch"}


def finite(metrics: Row) -> dict[str, float]:
    """The numbers of ``metrics`` a chart can show (a NaN metric stays in the CSV only)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and math.isfinite(v)}


class CsvLogger(RunLogger):
    """``metrics.csv`` in the run folder: one row per epoch, a column per metric (a column
    added later is empty in earlier rows). The hyperparameters are the folder's
    ``config.yaml``."""

    name = "csv"

    def __init__(self, ctx: LogContext) -> None:
        self.path = ctx.run_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = []

    def log_metrics(self, step: int, metrics: Row) -> None:
        self.rows.append({"epoch": step, **metrics})
        write_text(self.path, csv_text(self.rows))

    def replay(self, rows: Iterable[Row]) -> None:
        # the file is rewritten with the next epoch (rows logged after the checkpoint go then)
        self.rows = [dict(r) for r in rows]


def csv_text(rows: Sequence[Row]) -> str:
    import csv
    import io

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


class TensorBoardLogger(RunLogger):
    """Scalars and the HParams table under ``RUN/tensorboard``, rewritten on resume."""

    name = "tensorboard"

    def __init__(self, ctx: LogContext) -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder = ctx.run_dir / "tensorboard"
        shutil.rmtree(folder, ignore_errors=True)
        self.writer: SummaryWriter = SummaryWriter(str(folder))
        self.primary = list(ctx.primary)

    def log_hparams(self, params: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        # the table lists the run's parameters beside the final value of each reported metric
        simple = {k: v if isinstance(v, bool | int | float | str) else str(v)
                  for k, v in params.items()}
        # into this log, not a sub-folder per call as SummaryWriter.add_hparams writes them
        events = self.writer._get_file_writer()
        for summary in hparams(simple, dict.fromkeys(self.primary, 0.0)):
            events.add_summary(summary)

    def log_metrics(self, step: int, metrics: Row) -> None:
        for key, value in finite(metrics).items():
            self.writer.add_scalar(key, value, step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbLogger(RunLogger):
    """A Weights & Biases run (files under ``RUN/wandb``); ``WANDB_MODE=offline`` keeps it on
    this machine (``wandb sync RUN/wandb/offline-run-*`` uploads it). A resumed run continues
    the same run id; epochs that W&B already holds from a killed session (after the last
    checkpoint) keep their first values, as W&B's steps only increase."""

    name = "wandb"

    def __init__(self, ctx: LogContext) -> None:
        import wandb

        run_id = (ctx.state or {}).get("id")
        try:
            self.run = wandb.init(
                project=ctx.log.project, name=ctx.name, dir=str(ctx.run_dir), id=run_id,
                resume="allow" if run_id else None, reinit="create_new",
                settings=wandb.Settings(console="off", silent=True))
        except Exception as err:  # no API key, no network in online mode...
            raise ConfigError(f"log.backends: wandb could not start a run ({err}); without "
                              "network or an account: WANDB_MODE=offline") from None
        self.continues = run_id is not None

    def log_hparams(self, params: Mapping[str, Any]) -> None:
        self.run.config.update(dict(params))

    def log_metrics(self, step: int, metrics: Row) -> None:
        self.run.log(finite(metrics), step=step)

    def state_dict(self) -> dict[str, Any]:
        return {"id": self.run.id}

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


MLFLOW_BATCH = 100
"""Parameters per ``log_batch`` call (MLflow's limit; metrics: 1000)."""
MLFLOW_VALUE = 6000
"""Longest parameter value MLflow stores."""
_MLFLOW_NAME = re.compile(r"[^\w./\- :]")
"""Characters an MLflow key may not hold (``eval@source/...``: the ``@``)."""


class MlflowLogger(RunLogger):
    """An MLflow run in the experiment ``log.project``, tracked at ``log.mlflow_uri``, else
    ``MLFLOW_TRACKING_URI``, else a file store in ``RUN/mlruns`` (``mlflow ui
    --backend-store-uri RUN/mlruns``). A resumed run continues the same run id (re-trained
    epochs after the last checkpoint get a second value at their step)."""

    name = "mlflow"

    def __init__(self, ctx: LogContext) -> None:
        from mlflow.tracking import MlflowClient

        uri = mlflow_uri(ctx.log.mlflow_uri, ctx.run_dir)
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 refuses its file store unless told: it is the one that needs no server
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client: MlflowClient = MlflowClient(tracking_uri=uri)
        self.run_id = self._reopen((ctx.state or {}).get("run_id"))
        self.continues = self.run_id is not None
        if self.run_id is None:
            run = self.client.create_run(self._experiment(ctx.log.project), run_name=ctx.name)
            self.run_id = run.info.run_id

    def _reopen(self, run_id: str | None) -> str | None:
        if run_id is None:
            return None
        try:
            self.client.update_run(run_id, status="RUNNING")
        except Exception:  # not in this store (moved, another URI): a new run
            return None
        return run_id

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(self.client.create_experiment(name))
        except Exception:  # created meanwhile by a run beside this one
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return str(found.experiment_id)

    def log_hparams(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(_MLFLOW_NAME.sub("_", k), str(v)[:MLFLOW_VALUE])
                 for k, v in params.items()]
        assert self.run_id is not None
        for start in range(0, len(items), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=items[start:start + MLFLOW_BATCH])

    def log_metrics(self, step: int, metrics: Row) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_MLFLOW_NAME.sub("_", k), v, now, step)
                 for k, v in finite(metrics).items()]
        assert self.run_id is not None
        self.client.log_batch(self.run_id, metrics=items)

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def close(self, failed: bool = False) -> None:
        assert self.run_id is not None
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def mlflow_uri(configured: str | None, run_dir: Path) -> str:
    """``log.mlflow_uri``, else ``MLFLOW_TRACKING_URI``, else ``file:`` RUN/mlruns."""
    return (configured or os.environ.get("MLFLOW_TRACKING_URI")
            or (run_dir / "mlruns").resolve().as_uri())


BACKENDS: dict[str, Callable[[LogContext], RunLogger]] = {
    "tensorboard": TensorBoardLogger, "csv": CsvLogger, "wandb": WandbLogger,
    "mlflow": MlflowLogger,
}
"""``log.backends`` name -> backend (the config schema lists the same names)."""


def open_logger(name: str, ctx: LogContext) -> RunLogger:
    """The backend ``name``; a missing package is a ConfigError naming the key and the pip
    command."""
    try:
        return BACKENDS[name](ctx)
    except ImportError as err:
        raise missing_backend(name, (err.name or name).partition(".")[0]) from None
