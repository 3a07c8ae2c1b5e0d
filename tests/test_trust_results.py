"""Results that must not be saved or served, checkpoints that verify but lie, splits that say
nothing (issue 28, classes 1, 5 and 6). Fault injection in the style of ``test_trust.py``: a
good tiny run is copied and broken (its checkpoint rewritten with a recomputed digest, so that
only the new checks can catch it), or a training is sabotaged mid-run. Each test names the code
it guards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mtpsl.cli import main
from mtpsl.core.errors import DataError, NonFiniteResultError
from mtpsl.data.splits import REGIMES, Split, make_split
from mtpsl.engine import trainer as trainer_module
from mtpsl.engine.checkpoint import load_checkpoint, save_checkpoint
from mtpsl.inference.load import require_finite_outputs

from conftest import TINY_TRAIN, copy_run, train_cli

ARGS = [*TINY_TRAIN, "train.epochs=2", "train.eval_every=1", "train.checkpoint_every=1",
        "train.device=cpu", "train.max_steps_per_epoch=2"]


@pytest.fixture(scope="module")
def root(shared_layout) -> Path:
    """Read-only: 6 training images, so an epoch has 3 steps (2 with the cap)."""
    return shared_layout(n=6, h=32, w=32)


@pytest.fixture(scope="module")
def run(root, tmp_path_factory) -> Path:
    return train_cli(tmp_path_factory.mktemp("run") / "run", root, *ARGS)


def _error(capsys) -> str:
    """The one ``error:`` line of a failed command (after the start-up lines of a run)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _rewrite(folder: Path, change) -> Path:
    """``change(state)`` applied to the folder's checkpoint, saved with a fresh digest."""
    path = folder / "checkpoint.pt"
    state = load_checkpoint(path)
    change(state)
    save_checkpoint(state, path)
    return path


def _huge_weights(state: dict) -> None:
    """What a diverged optimiser leaves: finite weights (1e30 times their size) that give
    NaN/inf outputs, which the weight checks cannot see."""
    state["model"] = {k: v * 1e30 if v.is_floating_point() and "running" not in k else v
                      for k, v in state["model"].items()}


# -- 1. a non-finite evaluation is a failed run, never saved or served ----------------------

def test_a_run_whose_evaluation_is_non_finite_fails_and_keeps_its_checkpoint(
        root, tmp_path, capsys, monkeypatch):
    """Guards ``Trainer.evaluate`` (engine/trainer.py), which turns the NonFiniteResultError
    of ``engine.evaluate.evaluate`` into a one-line error before the epoch is logged or
    checkpointed. Without it the run exits 0 with NaN in final_metrics.json and a checkpoint
    of weights that give NaN."""
    folder = tmp_path / "run"
    real = trainer_module.evaluate
    seen = {"evals": 0, "checkpoint": b""}

    def evaluate(model, *args, **kwargs):
        seen["evals"] += 1
        if seen["evals"] == 2:  # epoch 2: weights diverge to huge but finite values
            seen["checkpoint"] = (folder / "checkpoint.pt").read_bytes()
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1e30)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "evaluate", evaluate)
    assert main(["train", "--run-dir", str(folder), f"dataset.root={root}", *ARGS]) == 2
    err = _error(capsys)
    assert "evaluation after epoch 2 is non-finite" in err and "eval/depth/abs_err = nan" in err
    assert f"the last checkpoint ({folder / 'checkpoint.pt'}, epoch 1) is unchanged" in err
    assert (folder / "checkpoint.pt").read_bytes() == seen["checkpoint"]
    assert not (folder / "final_metrics.json").exists()
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]  # the diverged epoch is not logged


def test_eval_and_export_refuse_a_model_with_non_finite_outputs(run, tmp_path, capsys):
    """Guards ``engine.evaluate.evaluate`` (predictions and metrics checked) as used by
    ``inference.evaluate.evaluate_checkpoint``, and the example forward pass of
    ``inference.export.export_run``; without them eval prints NaN and export writes a model
    that serves NaN, both with exit 0."""
    folder = copy_run(run, tmp_path / "huge")
    path = _rewrite(folder, _huge_weights)
    assert main(["eval", "--run", str(folder), "--device", "cpu"]) == 2
    err = _error(capsys)
    assert str(path) in err and "non-finite results on the val split" in err
    assert "depth/abs_err = nan" in err
    out = tmp_path / "m.pt"
    assert main(["export", "--run", str(folder), "--format", "torchscript",
                 "--out", str(out)]) == 2
    err = _error(capsys)
    assert str(path) in err and "outputs for semantic, depth, normal are non-finite" in err
    assert not out.exists()


def test_a_nan_metric_with_finite_predictions_is_still_served(run, capsys):
    """Guards the other side of ``engine.evaluate.nonfinite_results``: NaN with finite
    predictions is a metric's "nothing to score" (no labelled pixel), not a divergence."""
    from mtpsl.engine.evaluate import nonfinite_results

    scores = {"depth/abs_err": float("nan"), "semantic/miou": 0.5, "normal/mean": float("inf")}
    assert nonfinite_results(scores, []) == ["normal/mean = inf"]
    assert nonfinite_results(scores, ["semantic"]) == ["semantic (predictions NaN/inf)",
                                                       "normal/mean = inf"]
    assert main(["eval", "--run", str(run), "--device", "cpu"]) == 0  # a good run still is


def test_require_finite_outputs_names_what_and_the_tasks():
    """Guards ``inference.load.require_finite_outputs``, the check ``predict`` must make
    before writing arrays (tensors or numpy, as predict holds them)."""
    good = {"semantic": torch.zeros(1, 3, 2, 2), "depth": np.ones((2, 2), np.float32)}
    require_finite_outputs(good, "photo.png")
    bad = {**good, "depth": np.full((2, 2), np.nan, np.float32),
           "normal": torch.full((1, 3, 2, 2), float("inf"))}
    with pytest.raises(NonFiniteResultError, match=r"photo\.png: the model's outputs for "
                                                   r"depth, normal are non-finite"):
        require_finite_outputs(bad, "photo.png")


# -- 5. checkpoints that verify but lie: dtypes and counters checked on every load ----------

@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_weights_of_the_wrong_dtype_are_refused_naming_the_key(run, tmp_path, capsys, dtype):
    """Guards the dtype check of ``engine.checkpoint.load_module_state`` (used by eval,
    predict, export and resume); without it ``load_state_dict`` casts silently and the
    changed weights are evaluated."""
    folder = copy_run(run, tmp_path / "typed")
    key = next(k for k, v in load_checkpoint(run / "checkpoint.pt")["model"].items()
               if v.is_floating_point() and v.ndim == 4)

    def change(state):
        state["model"][key] = state["model"][key].to(dtype)

    path = _rewrite(folder, change)
    for args in (["eval", "--run", str(folder), "--device", "cpu"],
                 ["train", "--resume", str(folder), "train.epochs=3"]):
        assert main(args) == 2, args
        err = _error(capsys)
        assert str(path) in err and "wrong dtype" in err and key in err, err


def _steps_and_schedules(epoch: int, step: int):
    def change(state):
        state["epoch"], state["step"] = epoch, step
        for sched in state["optim"]["schedulers"]:
            sched["last_epoch"] = epoch
    return change


COUNTERS = {
    "negative epoch": (lambda s: s.update(epoch=-3), "'epoch' is -3, outside 0..2"),
    "epoch beyond train.epochs": (lambda s: s.update(epoch=7), "'epoch' is 7, outside 0..2"),
    "negative step": (lambda s: s.update(step=-1), "'step' is -1, outside >= 0"),
    "step after the last epoch": (lambda s: s.update(step=10**9),
                                  "'step' is 1000000000 after the last of the run's 2 epochs"),
    "step beyond an epoch": (_steps_and_schedules(1, 10**9),
                             "'step' is 1000000000, but an epoch of this run has 2 steps"),
    "schedule out of step": (
        lambda s: s["optim"]["schedulers"][0].update(last_epoch=10**6),
        "'optim.schedulers[0].last_epoch' is 1000000, but 'epoch' is 2"),
    "negative optimiser step": (
        lambda s: s["optim"]["optimizers"][0]["state"][0].update(step=torch.tensor(-5.0)),
        "'optim.optimizers[0].state.0.step' is -5.0"),
    "negative BatchNorm count": (
        lambda s: s["model"].update({k: torch.tensor(-1) for k in s["model"]
                                     if k.endswith("num_batches_tracked")}),
        "num_batches_tracked' is -1"),
}


@pytest.mark.parametrize("case", list(COUNTERS))
def test_counters_out_of_range_are_refused_on_resume(run, tmp_path, capsys, case):
    """Guards ``engine.checkpoint.check_counters`` (every ``load_checkpoint``) and the step
    bound of ``Trainer.__init__``; without them ``epoch=-3`` is a traceback on resume and
    ``step=1e9`` resumes into an empty epoch (loss nan, negative img/s)."""
    change, expect = COUNTERS[case]
    folder = copy_run(run, tmp_path / "counted")
    path = _rewrite(folder, change)
    assert main(["train", "--resume", str(folder), "train.epochs=3"]) == 2
    err = _error(capsys)
    assert str(path) in err and expect in err, err


def test_eval_refuses_an_impossible_epoch(run, tmp_path, capsys):
    """Guards ``engine.checkpoint.check_counters`` as ``inference.load.load_run`` meets it;
    without it eval prints ``epoch -3``."""
    folder = copy_run(run, tmp_path / "epoch")
    path = _rewrite(folder, lambda s: s.update(epoch=-3))
    assert main(["eval", "--run", str(folder), "--device", "cpu"]) == 2
    err = _error(capsys)
    assert str(path) in err and "'epoch' is -3" in err


# -- 6. splits that say nothing --------------------------------------------------------------

def test_a_split_file_labelling_nothing_is_refused(root, run, tmp_path, capsys):
    """Guards ``Split.load`` (data/splits.py): without it the run trains with every loss
    0.0000 and exits 0."""
    split = json.loads((run / "split.json").read_text())
    split["labelled"] = [[0] * len(row) for row in split["labelled"]]
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps(split))
    folder = tmp_path / "run"
    assert main(["train", "--run-dir", str(folder), f"dataset.root={root}", *ARGS,
                 f"labels.file={empty}"]) == 2
    err = _error(capsys)
    assert f"split file {empty} labels no task on any of its 6 images" in err
    assert not folder.exists()


@pytest.mark.parametrize("value", [2, -1, 0.5, "1"])
def test_split_values_other_than_zero_or_one_are_refused(run, tmp_path, value):
    """Guards ``_zero_one`` in ``Split.load``'s JSON reader; without it 2 and -1 are read as
    labelled."""
    split = json.loads((run / "split.json").read_text())
    split["labelled"][0][0] = value
    path = tmp_path / "split.json"
    path.write_text(json.dumps(split))
    with pytest.raises(DataError, match=rf"split file {path} is not a valid mtpsl split: "
                                        r"'labelled' must hold only 0/1"):
        Split.load(path)
    split["labelled"][0][0] = True  # booleans are what they say
    path.write_text(json.dumps(split))
    assert Split.load(path).labelled[0, 0]


def test_a_regime_labelling_nothing_is_refused(monkeypatch):
    """Guards the check in ``make_split``, which the config's builder reports as
    ``labels: ...`` (a ConfigError); without it a custom regime of zeros trains on nothing."""
    monkeypatch.setitem(REGIMES._entries, "nothing",
                        lambda n, t, rng: np.zeros((n, t), dtype=bool))
    with pytest.raises(ValueError, match="the 'nothing' regime labels no task on any of the "
                                         "5 training images"):
        make_split("nothing", 5, ("a", "b"), seed=0)
