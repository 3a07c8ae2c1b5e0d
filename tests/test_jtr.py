"""JTR: the batched terms against the code's per-sample form (float64, value and every
gradient), the encodings against scipy, the gradient-flow rules, and a CLI run that resumes
bitwise after a preemption."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import norm

from mtpsl.data.splits import make_split
from mtpsl.engine.checkpoint import load_checkpoint
from mtpsl.methods import build_method
from mtpsl.methods.jtr import JTRLoss, JTROptions
from mtpsl.methods.terms import map_cosine_distance as latent_distance
from mtpsl.tasks import build_task

from conftest import TINY, assert_same_state, load_benchmark, mtpsl_process, train_cli

H, W = 64, 96
TASK_SETS = {
    "nyuv2-like": {"semantic": ("segmentation", {"num_classes": 5}), "depth": ("depth", {}),
                   "normal": ("normal", {})},
    "cityscapes-like": {"semantic": ("segmentation", {"num_classes": 4}),
                        "depth": ("depth", {})},
    "pascal-like": {"semantic": ("segmentation", {"num_classes": 4}),
                    "parts": ("segmentation", {"num_classes": 3}), "normal": ("normal", {}),
                    "saliency": ("saliency", {}), "edges": ("edge", {})},
}


def _tasks(name):
    return {n: build_task(kind, n, **kw) for n, (kind, kw) in TASK_SETS[name].items()}


def _deterministic(task, pred, draw=""):
    """A differentiable, noise-free stand-in for the hard Gumbel sample (so both forms see
    the same 'sample')."""
    return task.encode_pred_eval(pred) + 0.1 * torch.tanh(pred)


def _view(tasks, n, seed):
    g = torch.Generator().manual_seed(seed)
    preds, targets = {}, {}
    for name, task in tasks.items():
        raw = torch.randn(n, task.out_channels, H, W, generator=g, dtype=torch.float64)
        preds[name] = task.activate(raw).requires_grad_(True)
        label = task.hard_label(task.activate(torch.randn(n, task.out_channels, H, W,
                                                           generator=g, dtype=torch.float64)))
        if task.continuous:
            label = label.abs() + 0.5
            label[:, :, :5] = 0.0  # invalid depth pixels
        elif task.label_dims == 0:
            label[:, :4] = -1  # ignored pixels
        elif label.shape[1] == 1:  # binary: probabilities -> 0/1 labels, some unlabelled
            label = (label > 0.5).to(label.dtype)
            label[:, :, :3] = -1.0
        targets[name] = label
    return preds, targets


@pytest.mark.parametrize("regime", ["onelabel", "random", "full"])
@pytest.mark.parametrize("task_set", list(TASK_SETS))
def test_batched_terms_equal_the_per_sample_form(regime, task_set):
    tasks = _tasks(task_set)
    torch.manual_seed(0)
    loss = JTRLoss(tasks, JTROptions(ae_width=0.0625)).double()
    n = 3
    labelled = torch.as_tensor(make_split(regime, n, tuple(tasks), seed=1).labelled)
    views = (_view(tasks, n, 2), _view(tasks, n, 3))
    batched = loss.terms(views, labelled, _deterministic)
    reference = loss.reference_terms(views, labelled, _deterministic)
    inputs = [*views[0][0].values(), *views[1][0].values(), *loss.parameters()]

    def grads(terms):
        total = sum(w * t.sum() for w, t in zip((1.0, 2.0, 3.0), terms.values(), strict=True))
        return torch.autograd.grad(total, inputs, allow_unused=True)

    for key in batched:
        torch.testing.assert_close(batched[key], reference[key], rtol=1e-10, atol=1e-12)
    for got, want in zip(grads(batched), grads(reference), strict=True):
        if want is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_gradient_flow_follows_the_code():
    """d1 moves the model through unlabelled tasks only and never the auto-encoder; d2 and
    the reconstruction move the auto-encoder only."""
    tasks = _tasks("nyuv2-like")
    loss = JTRLoss(tasks, JTROptions(ae_width=0.0625)).double()
    labelled = torch.tensor([[True, False, False], [False, True, True]])
    views = (_view(tasks, 2, 4), _view(tasks, 2, 5))
    terms = loss.terms(views, labelled, _deterministic)
    model_preds1, model_preds2 = list(views[0][0].values()), list(views[1][0].values())
    ae = list(loss.parameters())
    g = torch.autograd.grad(terms["d1"].sum(), [*model_preds1, *ae], allow_unused=True)
    for k, grad in enumerate(g[:3]):  # per task: image 0 labels task 0, image 1 tasks 1 and 2
        labelled_rows = labelled[:, k]
        assert grad is not None and not grad[labelled_rows].any() and grad[~labelled_rows].any()
    assert all(p is None or not p.any() for p in g[3:])
    g2 = torch.autograd.grad((terms["d2"] + terms["recon"]).sum(), [*model_preds2, *ae],
                             allow_unused=True)
    assert all(p is None for p in g2[:3])
    assert any(p is not None and p.any() for p in g2[3:])


def test_encodings_match_scipy_and_masks_predictions_only():
    """``pred_mask=after_encoding`` (mtpsl before issue 29): masked prediction pixels are 0.
    The default, the code's masking before encoding: tests/test_jtr_reference.py."""
    tasks = _tasks("nyuv2-like")
    o = JTROptions(ae_width=0.0625, pred_mask="after_encoding")
    loss = JTRLoss(tasks, o).double()
    preds, targets = _view(tasks, 2, 6)
    labelled = torch.tensor([[True, True, False], [False, False, True]])
    y, y_hat, mask = (t.detach() for t in loss.stacks(preds, targets, labelled, "soft",
                                                      _deterministic))
    depth = targets["depth"][0, 0].numpy()
    np.testing.assert_allclose(y[0, 5].numpy(), norm.cdf((depth - 2.3618) / 1.5876), rtol=1e-12)
    # image 0 labels semantic and depth: M is where both are valid; its label is not masked
    valid = (targets["semantic"][0] >= 0) & (targets["depth"][0, 0] != 0)
    assert torch.equal(mask[0], valid)
    assert y[0, 5][~valid].min() == pytest.approx(norm.cdf(-2.3618 / 1.5876))
    assert (y_hat[0][:, ~valid] == 0).all()
    soft = preds["semantic"][0].detach().exp()
    torch.testing.assert_close(y_hat[0, :5], soft * valid)
    assert latent_distance(y[:1], y[:1]).item() == pytest.approx(0.0, abs=1e-12)


# --- end to end ----------------------------------------------------------------------------

ARGS = [*TINY, "method.name=jtr", "method.options.ae_width=0.0625", "train.epochs=2",
        "train.eval_every=1", "train.device=cpu", "optim.lr=1e-3", "labels.regime=onelabel"]


@pytest.mark.slow  # three subprocess runs; the cheaper CLI run is the joint-space test below
def test_trains_from_the_cli_and_resumes_bitwise(tmp_path, shared_layout):
    root = shared_layout(n=8, h=H, w=W)
    reference, run = tmp_path / "reference", tmp_path / "run"
    done = mtpsl_process("train", "--run-dir", str(reference), f"dataset.root={root}", *ARGS)
    assert done.returncode == 0, done.stderr
    final = json.loads((reference / "final_metrics.json").read_text())
    assert np.isfinite(list(final["metrics"].values())).all()
    rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert all(rows[0][f"train/{k}"] > 0 for k in ("jtr_dist", "jtr_ae_dist", "jtr_recon"))
    hit = mtpsl_process("train", "--run-dir", str(run), f"dataset.root={root}", *ARGS,
                 fault="TERM@step#2")
    assert hit.returncode == 75, hit.stderr
    assert mtpsl_process("train", "--resume", str(run)).returncode == 0
    assert_same_state(load_checkpoint(reference / "checkpoint.pt"),
                      load_checkpoint(run / "checkpoint.pt"))


def test_options_are_validated():
    tasks = _tasks("cityscapes-like")
    with pytest.raises(Exception, match=r"method\.options\.depth_std"):
        build_method("jtr", tasks, {"depth_std": 0})


def test_the_task_scaling_benchmark_runs_every_method_on_five_tasks():
    """benchmarks/bench_task_scaling.py's measurement (one step, tiny) for the largest set."""
    from types import SimpleNamespace

    bench = load_benchmark("bench_task_scaling")
    args = SimpleNamespace(device="cpu", height=64, width=96, batch_size=2, width_mult=0.0625,
                           steps=1, warmup=0)
    for method in bench.METHODS:
        row = bench.measure_one(method, "5 (PASCAL-like)", "full", args)
        assert row["s_per_step"] > 0 and (row["method_parameters"] > 0) == (method != "sl")


def test_joint_space_figure_of_a_jtr_run(tmp_path, shared_layout):
    """The figure draws the latents of the stacked predictions and labels; its per-image
    number is 1 - the latent distance computed here from the loaded method."""
    from mtpsl.analysis.figures.joint import collect_joint_space
    from mtpsl.cli import main

    run = tmp_path / "run"
    args = [a for a in ARGS if not a.startswith("train.epochs")] + ["train.epochs=1"]
    train_cli(run, shared_layout(n=4, h=H, w=W), *args)
    data = collect_joint_space(run, "semantic,depth", [0, 1], device="cpu")
    assert data.titles == ("E(predictions)", "E(labels)")
    distance = latent_distance(data.mapped_source, data.mapped_target)
    np.testing.assert_allclose(data.mean_cosine, (1 - distance).numpy(), rtol=1e-5)
    out = tmp_path / "figs"
    assert main(["figures", "joint-space", "--runs", str(run), "--indices", "0", "1",
                 "--device", "cpu", "--out", str(out)]) == 0
    assert (out / "joint-space.png").is_file()
