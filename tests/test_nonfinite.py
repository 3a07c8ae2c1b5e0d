"""A diverging run stops with a one-line error naming the step and the term, and leaves the
last good checkpoint untouched; a non-finite gradient behind a finite loss is caught too."""

from __future__ import annotations

import json

import pytest
import torch

from mtpsl.cli import main
from mtpsl.engine.callbacks import divergence
from mtpsl.methods.supervised import SupervisedMultiTask

from conftest import make_layout, without_startup

STEPS = 12  # per epoch: more than CHECK_EVERY, so a bad step can fall between checks
ARGS = ["model.width=0.0625", "train.epochs=3", "train.batch_size=2", "train.eval_every=100",
        "train.checkpoint_every=1", "train.progress=false", "train.device=cpu",
        "optim.lr=1e-3"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_layout(tmp_path_factory.mktemp("data"), n=2 * STEPS, h=32, w=48)


def _sabotage(monkeypatch, bad_steps: set[int], damage, run_dir):
    """Apply ``damage(losses)`` at the given global (0-based, across epochs) training steps;
    record the checkpoint's bytes as they were when the first bad step ran."""
    original = SupervisedMultiTask.compute
    seen = {"calls": 0, "checkpoint": None}

    def compute(self, model, batch):
        losses, out = original(self, model, batch)
        if seen["calls"] in bad_steps:
            if seen["checkpoint"] is None:
                seen["checkpoint"] = (run_dir / "checkpoint.pt").read_bytes()
            damage(losses)
        seen["calls"] += 1
        return losses, out

    monkeypatch.setattr(SupervisedMultiTask, "compute", compute)
    return seen


def _nan_depth(losses):
    # the gradient may stay finite (no depth-labelled image in the batch): the loss is enough
    losses.tasks["depth"] = losses.tasks["depth"] * float("nan")


def _nan_gradient(losses):
    # the loss values stay finite; only what flows back through them is NaN (every task, as
    # a task without a labelled image in the batch sends no gradient at all)
    for loss in losses.tasks.values():
        loss.register_hook(lambda grad: grad * float("nan"))


@pytest.mark.parametrize(
    ("damage", "step_in_epoch", "expect", "absent"),
    [
        (_nan_depth, 3, "non-finite loss (depth)", ["semantic", "normal"]),
        (_nan_depth, STEPS, "non-finite loss (depth)", ["semantic", "normal"]),  # last step
        (_nan_gradient, 3, "non-finite gradients (the loss was finite)", ["depth"]),
    ],
)
def test_divergence_stops_the_run_and_names_step_and_term(
    root, tmp_path, monkeypatch, capsys, damage, step_in_epoch, expect, absent
):
    run = tmp_path / "run"
    first_bad = STEPS + step_in_epoch - 1  # epoch 2, 1-based step_in_epoch
    seen = _sabotage(monkeypatch, {first_bad, first_bad + 1}, damage, run)

    code = main(["train", "--run-dir", str(run), f"dataset.root={root}", *ARGS])

    err = without_startup(capsys.readouterr().err)
    assert code == 2, err
    line = err.strip().splitlines()[-1]  # after epoch 1's progress line
    assert line.startswith("error: ") and "Traceback" not in err
    assert [k for k in err.strip().splitlines() if not k.startswith("epoch 1/3")] == [line]
    assert f"epoch 2, step {step_in_epoch} of {STEPS}:" in line
    assert expect in line
    assert not any(word in line for word in absent)
    # the run stopped at the first check after the bad step: never reached epoch 3
    assert seen["calls"] <= STEPS + min(step_in_epoch + divergence.CHECK_EVERY, STEPS)
    # the epoch-1 checkpoint is untouched, byte for byte, and nothing later was recorded
    assert (run / "checkpoint.pt").read_bytes() == seen["checkpoint"]
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1]
    assert not (run / "final_metrics.json").exists()


def test_a_clean_run_is_not_flagged_and_check_is_not_per_step(root, tmp_path, monkeypatch):
    checks = []
    original = divergence.check_finite
    monkeypatch.setattr(divergence, "check_finite",
                        lambda *a: checks.append(a[1]) or original(*a))
    assert main(["train", "--run-dir", str(tmp_path / "ok"), f"dataset.root={root}", *ARGS,
                 "train.epochs=1"]) == 0
    assert len(checks) == 3  # steps 1, 11 and 12 of 12: one host sync per CHECK_EVERY steps


def test_watch_records_only_the_first_bad_step():
    watch = divergence._Flags("cpu")
    ok, nan = torch.tensor(1.0), torch.tensor(float("nan"))
    grad = [torch.ones(3)]
    watch.update(0, {"total": ok, "a": ok, "b": ok}, grad)
    assert watch.report() is None
    watch.update(1, {"total": nan, "a": ok, "b": nan}, grad)
    watch.update(2, {"total": nan, "a": nan, "b": nan}, [torch.full((2,), float("inf"))])
    assert watch.report() == (1, ["total", "b"])
    with pytest.raises(divergence.NonFiniteLossError, match=r"epoch 5, step 2 of 9: "
                       r"non-finite loss \(b\); stopped"):
        divergence.check_finite(watch, 4, 9)
