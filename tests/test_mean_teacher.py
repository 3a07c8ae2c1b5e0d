"""mean_teacher (Tarvainen & Valpola 2017, dense multi-task): the consistency against a
per-image loop, the EMA update by hand, a teacher no optimiser holds, the ramp-up, and CLI
training that resumes bitwise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtpsl.cli import main
from mtpsl.engine.checkpoint import load_checkpoint
from mtpsl.methods import build_method
from mtpsl.methods.mean_teacher import sigmoid_rampup
from test_ssl import _batch, _model, _reference_consistency, dataset  # noqa: F401

from conftest import TINY_TRAIN, assert_same_state

LABELLED = np.array([[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 1, 0], [1, 0, 1], [0, 0, 1]],
                    dtype=bool)


def _method(ds, model, **options):
    method = build_method("mean_teacher", ds.tasks, options)
    method.attach(model)
    return method


def test_consistency_is_the_teachers_view0_against_the_students_view1(dataset):  # noqa: F811
    batch = _batch(dataset, LABELLED, flip=True, seed=3)
    model = _model(dataset).double().eval()
    method = _method(dataset, model, weight=0.7)
    method.teacher.double()
    with torch.no_grad():  # a teacher that differs from the student
        for p in method.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for view in batch.views:
        view.image = view.image.double()
    losses, _ = method.compute(model, batch)
    with torch.no_grad():
        teacher0 = method.teacher.eval()(batch.views[0].image).preds
    student1 = model(batch.views[1].image).preds
    want = _reference_consistency(dataset.tasks, batch, teacher0, student1, 0.7)
    torch.testing.assert_close(losses.extra["mean_teacher"], want, rtol=1e-9, atol=0)
    grads = torch.autograd.grad(losses.extra["mean_teacher"], list(model.parameters()),
                                allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())


def test_ema_update_by_hand_and_the_teacher_is_never_optimised(dataset):  # noqa: F811
    model = _model(dataset)
    method = _method(dataset, model, decay=0.9)
    (group,) = method.optimizer_groups(model)
    teacher_ids = {id(p) for p in method.teacher.parameters()}
    assert not teacher_ids & {id(p) for p in group.params}
    key = next(k for k, v in model.state_dict().items() if v.is_floating_point())
    history = []
    for k in range(4):
        before = method.teacher.state_dict()[key].clone()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)
        student = model.state_dict()[key].clone()
        method.after_step(model)
        a = min(1 - 1 / (k + 1), 0.9)  # the paper's warm-up: the first update copies
        torch.testing.assert_close(method.teacher.state_dict()[key], a * before + (1 - a) * student)
        history.append(a)
    assert history == pytest.approx([0.0, 0.5, 2 / 3, 0.75]) and int(method.updates) == 4
    assert "teacher." + key in method.state_dict() and "updates" in method.state_dict()


def test_sigmoid_rampup():
    assert sigmoid_rampup(0, 0) == 1.0 and sigmoid_rampup(7, 5) == 1.0
    assert sigmoid_rampup(0, 4) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(2, 4) == pytest.approx(math.exp(-5 * 0.25))


def test_trains_from_the_cli_and_resumes_bitwise(tmp_path):
    from mtpsl.data.synthetic import write_nyuv2_layout

    root = write_nyuv2_layout(tmp_path / "data", n_train=4, n_val=2, height=32, width=48,
                              progress=False)
    args = ["--config", "synthetic_demo", f"dataset.root={root}", "method.name=mean_teacher",
            "method.options.rampup_epochs=2", *TINY_TRAIN, "train.max_steps_per_epoch=2",
            "train.checkpoint_every=1", "train.device=cpu"]
    assert main(["train", "--run-dir", str(tmp_path / "full"), *args, "train.epochs=2"]) == 0
    assert main(["train", "--run-dir", str(tmp_path / "part"), *args]) == 0
    assert main(["train", "--resume", str(tmp_path / "part"), "train.epochs=2"]) == 0
    full = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    part = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert any(k.startswith("teacher.") for k in full["method"])
    assert int(full["method"]["updates"]) == 4
    for section in ("model", "method", "optim"):
        assert_same_state(full[section], part[section], section)
