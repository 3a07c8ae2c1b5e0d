"""Logging backends behind one interface (issue 30, item 6): TensorBoard, CSV, W&B, MLflow.

Each backend is driven through the :class:`~mtpsl.engine.callbacks.logging.Loggers` callback
for a run's two sessions (a first one, then a resume from its checkpoint) and its record is
read back with the backend's own reader: the hyperparameters once, each epoch once. W&B runs
offline and MLflow on a file store, both in the test's folder (HOME too), so nothing leaves it.
"""

from __future__ import annotations

import csv
import io
import math
import struct
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mtpsl.core.config import Config, load_config
from mtpsl.core.errors import ConfigError
from mtpsl.core.signature import setup_from_config
from mtpsl.engine.callbacks import Loggers
from mtpsl.engine.callbacks.loggers import LogContext, open_logger
from mtpsl.engine.history import History
from mtpsl.tasks import build_task

from conftest import TINY_TRAIN, train_cli

TASKS = {"semantic": build_task("segmentation", "semantic", num_classes=3),
         "depth": build_task("depth", "depth")}
FIRST = [{"epoch": 1, "train/total": 2.0, "lr": 0.1},
         {"epoch": 2, "train/total": 1.5, "lr": 0.1, "eval/semantic/miou": 0.25,
          "eval@a_src/depth/rmse": 0.5, "eval/depth/abs_err": math.nan}]
"""The first session's epochs; its checkpoint was written after epoch 1 only."""
SECOND = [{"epoch": 2, "train/total": 1.25, "lr": 0.1, "eval/semantic/miou": 0.3},
          {"epoch": 3, "train/total": 1.0, "lr": 0.05}]
"""The resumed session: epoch 2 trained again (its first try was after the checkpoint), 3."""


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """W&B offline and MLflow without telemetry, every file they write under ``tmp_path``."""
    home = tmp_path / "home"
    home.mkdir()
    for name, value in {
        "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_CONFIG_HOME": str(home / ".config"), "WANDB_MODE": "offline",
        "WANDB_SILENT": "true", "WANDB_CACHE_DIR": str(home / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(home / "wandb-config"), "WANDB_DATA_DIR": str(home / "wandb"),
        "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("MLFLOW_TRACKING_URI", "WANDB_API_KEY", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(name, raising=False)  # and removed again afterwards if set
    yield tmp_path
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()  # its service process, started by wandb.init


def _config(backends: Sequence[str], *overrides: str) -> Config:
    return load_config(None, [f"log.backends=[{', '.join(backends)}]", "model.width=0.25",
                              "train.epochs=2", *overrides])


def _session(run_dir: Path, config: Config, rows: Sequence[dict], kept: Sequence[dict] = (),
             state: dict | None = None) -> dict:
    """One training session's logging: opened (resumed from ``state`` with the ``kept`` rows
    of the checkpoint), ``rows`` logged, closed; returns what its checkpoint would record."""
    loggers = Loggers(History(run_dir, [dict(r) for r in kept]))
    trainer: Any = SimpleNamespace(exp=SimpleNamespace(config=config, tasks=TASKS),
                                   run_dir=run_dir)
    if state is not None:
        loggers.load_state_dict(state)
    loggers.on_fit_start(trainer)
    for row in rows:
        loggers.on_epoch_end(trainer, row)
    saved = loggers.state_dict()
    loggers.on_fit_end(trainer)
    return saved


def _two_sessions(run_dir: Path, backends: Sequence[str]) -> list[dict]:
    """FIRST with a checkpoint after epoch 1, then SECOND resumed from it (its config asks
    for 3 epochs: a hyperparameter logged again would show 3)."""
    run_dir.mkdir(exist_ok=True)
    loggers = Loggers(History(run_dir))
    trainer: Any = SimpleNamespace(exp=SimpleNamespace(config=_config(backends), tasks=TASKS),
                                   run_dir=run_dir)
    loggers.on_fit_start(trainer)
    loggers.on_epoch_end(trainer, FIRST[0])
    checkpoint = loggers.state_dict()
    loggers.on_epoch_end(trainer, FIRST[1])
    loggers.on_exception(trainer, RuntimeError("killed"))
    loggers.on_fit_end(trainer)
    second = _session(run_dir, _config(backends, "train.epochs=3"), SECOND, FIRST[:1],
                      checkpoint)
    return [checkpoint, second]


# --- TensorBoard and CSV (the default) --------------------------------------------------------

def _events(run_dir: Path) -> list:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [event for path in sorted((run_dir / "tensorboard").glob("events.*"))
            for event in EventFileLoader(str(path)).Load()]


def _tensorboard(run_dir: Path) -> tuple[list[tuple[str, int, float]], list]:
    """The scalars (tag, step, value) and the HParams summaries of ``run_dir/tensorboard``."""
    from tensorboard.util.tensor_util import make_ndarray

    values = [(v, e.step) for e in _events(run_dir) if e.HasField("summary")
              for v in e.summary.value]
    scalars = sorted((v.tag, step, float(make_ndarray(v.tensor))) for v, step in values
                     if not v.tag.startswith("_hparams_/"))  # the loader's tensors
    return scalars, [v for v, _ in values if v.tag.startswith("_hparams_/")]


def test_tensorboard_and_csv_rewrite_their_record_on_resume_with_the_hparams_once(tmp_path):
    from tensorboard.plugins.hparams import plugin_data_pb2

    states = _two_sessions(tmp_path, ["tensorboard", "csv"])
    assert states == [{}, {}]  # nothing to continue: both start afresh on resume
    scalars, hparams = _tensorboard(tmp_path)
    expected = sorted((k, row["epoch"], v) for row in [FIRST[0], *SECOND]
                      for k, v in row.items() if k != "epoch")
    # epoch 2 once, with the resumed values (TensorBoard stores float32)
    assert [s[:2] for s in scalars] == [e[:2] for e in expected]
    assert [s[2] for s in scalars] == pytest.approx([e[2] for e in expected], rel=1e-6)
    starts = [v for v in hparams if v.tag == "_hparams_/session_start_info"]
    assert len(starts) == 1
    data = plugin_data_pb2.HParamsPluginData.FromString(starts[0].metadata.plugin_data.content)
    logged = data.session_start_info.hparams
    assert logged["model.width"].number_value == 0.25
    assert logged["train.epochs"].number_value == 3  # the rewritten record is the resumed run's
    assert logged["log.backends"].string_value == "['tensorboard', 'csv']"

    rows = list(csv.DictReader(io.StringIO((tmp_path / "metrics.csv").read_text())))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert rows[1]["train/total"] == "1.25" and rows[2]["eval/semantic/miou"] == ""
    assert list(rows[0]) == ["epoch", "train/total", "lr", "eval/semantic/miou"]


def test_the_csv_keeps_a_nan_that_the_charts_leave_out(tmp_path):
    _session(tmp_path, _config(["csv", "tensorboard"]), FIRST)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "metrics.csv").read_text())))
    assert rows[1]["eval/depth/abs_err"] == "nan" and rows[1]["eval@a_src/depth/rmse"] == "0.5"
    tags = {tag for tag, _, _ in _tensorboard(tmp_path)[0]}
    assert "eval@a_src/depth/rmse" in tags and "eval/depth/abs_err" not in tags


@pytest.mark.parametrize(("backend", "written", "absent"), [
    ("csv", "metrics.csv", "tensorboard"), ("tensorboard", "tensorboard", "metrics.csv")])
def test_only_the_named_backends_write(tmp_path, backend, written, absent):
    _session(tmp_path, _config([backend]), FIRST)
    assert (tmp_path / written).exists() and not (tmp_path / absent).exists()


# --- configuration and installation -----------------------------------------------------------

def test_backends_are_validated_and_are_no_part_of_the_setup():
    assert Config().log.backends == ["tensorboard", "csv"]
    with pytest.raises(ConfigError, match=r"log\.backends\.1: .*'tensorboard', 'csv', 'wandb' "
                                          r"or 'mlflow'.* \(got 'neptune'\)"):
        load_config(None, ["log.backends=[csv, neptune]"])
    with pytest.raises(ConfigError, match="names a backend twice"):
        load_config(None, ["log.backends=[csv, csv]"])
    logged = load_config(None, ["log.backends=[wandb]", "log.project=p"]).model_dump()
    assert setup_from_config(logged) == setup_from_config(Config().model_dump())


def test_a_backend_not_installed_names_the_key_and_the_pip_command(tmp_path, monkeypatch):
    from mtpsl.core import names

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    ctx = LogContext(tmp_path, "run", Config().log)
    with pytest.raises(ConfigError, match=r"^log\.backends: wandb needs the package 'wandb', "
                                          r"which is not installed \(pip install "
                                          r"'mtpsl\[wandb\]'\)"):
        open_logger("wandb", ctx)
    real = names.importlib.util.find_spec
    monkeypatch.setattr(names.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    config = load_config(None, [f"dataset.root={tmp_path}", "log.backends=[csv, mlflow]"])
    with pytest.raises(ConfigError, match=r"mlflow needs .*\(pip install 'mtpsl\[mlflow\]'\)"):
        names.preflight(config)


# --- W&B and MLflow (their imports take seconds: slow tier) -------------------------------------

def _wandb_records(run_dir: Path) -> list[list]:
    """The records of each offline W&B session under ``run_dir/wandb``, in order: W&B's
    transaction log (LevelDB log blocks of protobuf records after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    sessions = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, records, pos, chunk = path.read_bytes(), [], 7, b""
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            size, kind = struct.unpack("<HB", data[pos + 4:pos + 7]) if left >= 7 else (0, 0)
            if size == 0 and kind == 0:  # the rest of the block is padding
                pos += left
                continue
            chunk += data[pos + 7:pos + 7 + size]
            pos += 7 + size
            if kind in (1, 4):  # a whole record, or the last piece of one
                records.append(wandb_internal_pb2.Record.FromString(chunk))
                chunk = b""
        sessions.append(records)
    return sessions


def _of_type(records: list, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


@pytest.mark.slow
def test_wandb_continues_the_run_id_and_logs_the_hparams_once(offline):
    import json

    run_dir = offline / "run"
    states = _two_sessions(run_dir, ["wandb"])
    run_id = states[0]["wandb"]["id"]
    assert states[1] == states[0]
    sessions = _wandb_records(run_dir)
    assert len(sessions) == 2
    configs, steps = [], []
    for records in sessions:
        assert [run.run_id for run in _of_type(records, "run")] == [run_id]
        updates = [*(u for run in _of_type(records, "run") for u in run.config.update),
                   *(u for config in _of_type(records, "config") for u in config.update)]
        configs.append({u.key: json.loads(u.value_json) for u in updates
                        if not u.key.startswith("_")})
        steps.append([{item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in history.item} for history in _of_type(records, "history")])
    assert configs[0]["model.width"] == 0.25 and configs[0]["train.epochs"] == 2
    assert configs[1] == {}  # not logged again on resume
    assert [(h["_step"], h["train/total"]) for h in steps[0]] == [(1, 2.0), (2, 1.5)]
    assert [(h["_step"], h["train/total"]) for h in steps[1]] == [(2, 1.25), (3, 1.0)]
    assert "eval/depth/abs_err" not in steps[0][1]  # NaN: not charted


def _mlflow_runs(run_dir: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("mtpsl")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time"])
    return [(run, {key: [(m.step, m.value) for m in client.get_metric_history(
        run.info.run_id, key)] for key in run.data.metrics}) for run in runs]


@pytest.mark.slow
def test_mlflow_continues_the_run_id_and_logs_the_hparams_once(offline):
    run_dir = offline / "run"
    states = _two_sessions(run_dir, ["mlflow"])
    assert states[1] == states[0]
    [(run, history)] = _mlflow_runs(run_dir)
    assert run.info.run_id == states[0]["mlflow"]["run_id"]
    assert run.info.status == "FINISHED"
    assert run.data.params["model.width"] == "0.25"
    assert run.data.params["train.epochs"] == "2"  # the first session's: not logged again
    assert len(run.data.params) == len(setup_keys := _flat_config())
    assert set(run.data.params) == setup_keys
    # epoch 2 trained again after the checkpoint: MLflow holds both of its values
    assert sorted(history["train/total"]) == [(1, 2.0), (2, 1.25), (2, 1.5), (3, 1.0)]
    assert history["eval_a_src/depth/rmse"] == [(2, 0.5)]  # '@' is no MLflow key character
    assert "eval/depth/abs_err" not in history


def _flat_config() -> set[str]:
    from mtpsl.core.signature import flatten

    return set(flatten(_config(["mlflow"]).model_dump()))


@pytest.mark.slow
def test_a_checkpoint_without_a_run_id_starts_a_new_complete_record(offline):
    """A checkpoint written before the backend was there (or that lost its id) resumes into a
    new MLflow run with the hyperparameters and the epochs the checkpoint kept."""
    run_dir = offline / "run"
    run_dir.mkdir()
    _session(run_dir, _config(["mlflow"]), FIRST)
    _session(run_dir, _config(["mlflow"], "train.epochs=3"), SECOND, FIRST[:1], state={})
    (first, _), (second, history) = _mlflow_runs(run_dir)
    assert first.info.run_id != second.info.run_id
    assert second.data.params["train.epochs"] == "3"
    assert sorted(history["train/total"]) == [(1, 2.0), (2, 1.25), (3, 1.0)]


@pytest.mark.slow
def test_mtpsl_resume_continues_the_wandb_and_mlflow_runs(offline, tiny_root, capsys):
    run = offline / "run"
    args = [*TINY_TRAIN, "train.epochs=1", "train.device=cpu",
            "log.backends=[tensorboard, csv, wandb, mlflow]"]
    train_cli(run, tiny_root, *args)
    assert "wrote" in (err := capsys.readouterr().err) and "wandb/, mlruns/" in err
    from mtpsl.cli import main

    assert main(["train", "--resume", str(run), "train.epochs=2"]) == 0
    sessions = _wandb_records(run)
    assert len(sessions) == 2
    assert len({run.run_id for records in sessions for run in _of_type(records, "run")}) == 1
    [(mlflow_run, history)] = _mlflow_runs(run)
    assert [step for step, _ in history["train/total"]] == [1, 2]
    assert mlflow_run.data.params["train.epochs"] == "1"
    assert len((run / "metrics.csv").read_text().splitlines()) == 3
