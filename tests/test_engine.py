"""The training engine: the loop calls its callbacks' hooks in order, callbacks come from the
config or from Python, their state survives a resume, and a callback can stop a run the way a
preemption does."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from mtpsl.core.config import load_config
from mtpsl.core.errors import ConfigError, Preempted
from mtpsl.core.signature import setup_from_config, signature
from mtpsl.engine.callbacks import Callback
from mtpsl.engine.checkpoint import load_checkpoint
from mtpsl.engine.run import resume, train

from conftest import make_layout

STEPS = 3  # per epoch: 6 training images, batch 2
BASE = ["model.width=0.0625", "train.batch_size=2", "train.eval_every=2",
        "train.checkpoint_every=1", "train.progress=false", "train.device=cpu",
        "train.amp=off", "train.channels_last=false"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_layout(tmp_path_factory.mktemp("data"), n=2 * STEPS, h=32, w=48)


def _config(root, *overrides):
    return load_config(None, [f"dataset.root={root}", *BASE, *overrides])


class Recorder(Callback):
    """Every hook call, as (hook, epoch, step index or None)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def _note(self, hook, trainer, result=None):
        self.calls.append((hook, trainer.epoch, None if result is None else result.index))

    def on_fit_start(self, trainer):
        self._note("fit_start", trainer)

    def on_epoch_start(self, trainer):
        self._note("epoch_start", trainer)

    def on_after_backward(self, trainer, result):
        self._note("after_backward", trainer, result)

    def on_optimizer_step(self, trainer, result):
        self._note("optimizer_step", trainer, result)

    def on_step_end(self, trainer, result):
        self._note("step_end", trainer, result)

    def on_train_epoch_end(self, trainer, row):
        assert "lr" in row and "train/total" in row and not any(k.startswith("eval/") for k in row)
        self._note("train_epoch_end", trainer)

    def on_eval_end(self, trainer, metrics):
        assert metrics and all(k.startswith("eval/") for k in metrics)
        self._note("eval_end", trainer)

    def on_epoch_end(self, trainer, row):
        self._note("epoch_end", trainer)

    def on_stop(self, trainer, steps):
        self._note("stop", trainer, None)

    def on_exception(self, trainer, error):
        self._note(f"exception:{type(error).__name__}", trainer)

    def on_fit_end(self, trainer):
        self._note("fit_end", trainer)


def _steps(epoch, updates):
    calls = []
    for index in range(STEPS):
        calls.append(("after_backward", epoch, index))
        if index in updates:
            calls.append(("optimizer_step", epoch, index))
        calls.append(("step_end", epoch, index))
    return calls


def test_hooks_come_in_the_loop_order(root, tmp_path):
    recorder = Recorder()
    train(_config(root, "train.epochs=2"), tmp_path / "run", callbacks=[recorder])
    expected = [("fit_start", 0, None)]
    for epoch in range(2):
        expected += [("epoch_start", epoch, None), *_steps(epoch, {0, 1, 2}),
                     ("train_epoch_end", epoch, None)]
        if epoch == 1:  # eval_every=2
            expected.append(("eval_end", epoch, None))
        expected.append(("epoch_end", epoch, None))
    assert recorder.calls == [*expected, ("fit_end", 1, None)]


def test_accumulated_micro_batches_step_the_optimiser_at_each_group_end(root, tmp_path):
    recorder = Recorder()
    train(_config(root, "train.epochs=1", "train.accumulate=2"), tmp_path / "run",
          callbacks=[recorder])
    # groups {0, 1} and {2} (the epoch's last group is shorter)
    assert [c for c in recorder.calls if c[0] in ("after_backward", "optimizer_step",
                                                  "step_end")] == _steps(0, {1, 2})


class EpochCounter(Callback):
    """Counts epochs across a resume (its state) and adds a key to every logged row."""

    def __init__(self, key: str = "count", stop_at: int | None = None) -> None:
        self.key, self.stop_at, self.count = key, stop_at, 0

    def on_step_end(self, trainer, result):
        if trainer.epoch == 0 and result.index == 1 and self.stop_at == 1:
            trainer.request_stop("the test's callback")

    def on_epoch_end(self, trainer, row):
        self.count += 1
        row[self.key] = self.count

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    """A module of the user's own, importable by name, defining EpochCounter."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "my_callbacks.py").write_text(textwrap.dedent("""
        from test_engine import EpochCounter

        class NotACallback:
            pass
    """))
    monkeypatch.syspath_prepend(str(folder))
    yield "my_callbacks"
    sys.modules.pop("my_callbacks", None)


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_config_callback_logs_into_the_rows_and_its_state_survives_a_resume(
        root, tmp_path, plugin_module):
    run = tmp_path / "run"
    entry = f"train.callbacks=[{{class_path: '{plugin_module}:EpochCounter', options: " \
            "{key: epochs_seen}}]"
    train(_config(root, "train.epochs=1", entry), run)
    assert [r["epochs_seen"] for r in _rows(run)] == [1]
    state = load_checkpoint(run / "checkpoint.pt")
    assert list(state["callbacks"].values()) == [{"count": 1}]
    resume(run, ["train.epochs=2"])
    assert [r["epochs_seen"] for r in _rows(run)] == [1, 2]  # counted on from the checkpoint


def test_a_callback_that_requests_a_stop_leaves_a_resumable_run(root, tmp_path):
    """Stopped mid-epoch by a callback, resumed, the run ends where an uninterrupted one
    does: the same metrics, bit for bit."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(_config(root, "train.epochs=2"), whole)
    with pytest.raises(Preempted, match=r"stopped by the test's callback after step 2 of "
                                        r"epoch 1; checkpoint written to"):
        train(_config(root, "train.epochs=2"), cut, callbacks=[EpochCounter(stop_at=1)])
    assert load_checkpoint(cut / "checkpoint.pt")["step"] == 2
    resume(cut)
    assert _rows(cut) == _rows(whole)


@pytest.mark.parametrize(("entry", "message"), [
    ("train.callbacks=[no_such_module_xyz:Thing]", r"train.callbacks\[0\]: cannot import"),
    ("train.callbacks=[my_callbacks:NotACallback]", r"train.callbacks\[0\]: .* is not a "
                                                     r"subclass of mtpsl.engine.callbacks"),
    ("train.callbacks=[{class_path: 'my_callbacks:EpochCounter', options: {colour: red}}]",
     r"train.callbacks\[0\].options: .*colour"),
])
def test_a_bad_callback_entry_is_a_config_error_naming_it(root, tmp_path, plugin_module,
                                                          entry, message):
    with pytest.raises(ConfigError, match=message):
        train(_config(root, "train.epochs=1", entry), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # a set-up failure leaves nothing behind


def test_a_malformed_class_path_fails_at_load():
    with pytest.raises(ConfigError, match=r"train.callbacks.0.class_path"):
        load_config(None, ["train.callbacks=[not a path]"])


def test_callbacks_join_the_setup_only_when_given(root):
    plain = setup_from_config(_config(root).model_dump())
    assert "callbacks" not in plain["train"]  # the signature of runs before the key existed
    given = setup_from_config(_config(root, "train.callbacks=[a.b:C]").model_dump())
    assert given["train"]["callbacks"] == [{"class_path": "a.b:C", "options": {}}]
    assert signature(plain) != signature(given)


def test_the_documented_callback_runs_from_the_config(root, tmp_path, monkeypatch):
    """docs/extending.md's example, taken from the page itself, trained from the config."""
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "extending.md").read_text()
    code = page.split("# my_callbacks.py\n", 1)[1].split("```", 1)[0]
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "my_callbacks.py").write_text(code)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "my_callbacks", raising=False)
    run = tmp_path / "run"
    entry = "train.callbacks=[{class_path: my_callbacks:LogLearningRates, options: {every: 2}}]"
    train(_config(root, "train.epochs=2", entry), run)
    rows = _rows(run)
    assert "lr/0" not in rows[0] and rows[1]["lr/0"] == rows[1]["lr"]
    sys.modules.pop("my_callbacks", None)
