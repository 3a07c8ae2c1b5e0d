"""XTC (paper 001, Eq. 4): the batched loss equals the per-sample, per-pair reference form."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mtpsl.cli import main
from mtpsl.data import DATASETS
from mtpsl.methods import build_method
from mtpsl.methods.joint_space import JointSpaceMapper, pair_index
from mtpsl.methods.xtc import XTCLoss, consistency_pairs
from mtpsl.models import HeadSpec, build_model, count_parameters
from mtpsl.tasks import SegmentationTask

from conftest import make_layout

NYU = {"semantic": 13, "depth": 1, "normal": 3}


def test_reference_parameter_counts():
    mapper = JointSpaceMapper(NYU)
    assert count_parameters(mapper) == 14_819_328  # "14.82M" in the paper
    assert sum(p.numel() for p in mapper.film_parameters()) == 50_688
    assert JointSpaceMapper(NYU, conditioned=False).film_parameters() == []


def test_pair_order_matches_the_flattened_one_hot():
    order = [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    assert [pair_index(s, t, 3) for s, t in order] == list(range(6))
    with pytest.raises(ValueError):
        pair_index(1, 1, 3)


def test_pair_selection_rules():
    labelled = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    rows = consistency_pairs(labelled)
    got = sorted(zip(rows.image.tolist(), rows.source.tolist(), rows.target.tolist(),
                     strict=True))
    expected = [(0, 1, 0), (0, 2, 0), (1, 0, 1), (1, 0, 2)]
    expected += [(2, s, t) for s in range(3) for t in range(3) if s != t]
    assert got == sorted(expected)
    for i, s, t, p in zip(rows.image, rows.source, rows.target, rows.pair, strict=True):
        assert p == pair_index(int(s), int(t), 3), (i, s, t)


def test_film_starts_as_identity_and_norm_is_per_sample():
    torch.manual_seed(0)
    cond = JointSpaceMapper(NYU, filters=[4, 8, 8, 16, 16])
    plain = JointSpaceMapper(NYU, conditioned=False, filters=[4, 8, 8, 16, 16])
    plain.load_state_dict(cond.state_dict(), strict=False)
    x = torch.rand(3, 1, 64, 64)
    pairs = torch.tensor([0, 3, 5])
    torch.testing.assert_close(cond("depth", x, pairs), plain("depth", x, pairs))
    alone = torch.cat([cond("depth", x[i : i + 1], pairs[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(cond("depth", x, pairs), alone, rtol=1e-4, atol=1e-4)


def _setup(tmp_path, h=64, w=96, dtype=torch.float32):
    ds = DATASETS.get("nyuv2")(make_layout(tmp_path, n=5, h=h, w=w), "train")
    tasks = ds.tasks
    torch.manual_seed(0)
    heads = {n: HeadSpec(t.out_channels, t.activate) for n, t in tasks.items()}
    model = build_model("segnet", heads, width=0.0625).to(dtype)
    targets = {n: torch.stack([ds[i][n] for i in range(5)]) for n in tasks}
    targets = {n: v if v.is_floating_point() is False else v.to(dtype) for n, v in targets.items()}
    out = model(torch.stack([ds[i]["image"] for i in range(5)]).to(dtype))
    return tasks, model, out, targets


def _soft(task, x):
    # Deterministic stand-in for the Gumbel sample, so both forms see identical inputs.
    return x.exp() if isinstance(task, SegmentationTask) else task.encode_pred(x)


@pytest.mark.parametrize(
    ("dtype", "tol", "grad_tol"), [(torch.float64, 1e-10, 1e-10), (torch.float32, 1e-5, 1e-4)]
)
@pytest.mark.parametrize("reg_weight", [0.5, 0.0])
def test_batched_equals_reference_in_value_and_gradient(tmp_path, reg_weight, dtype, tol,
                                                        grad_tol):
    """Float64 shows the two forms are the same function (1e-10). In float32 the losses agree
    to 1e-5; gradients (relative norm) to 1e-4, because the tiny random model's normal head
    has near-zero outputs whose L2 normalisation amplifies float32 summation-order noise."""
    tasks, model, out, targets = _setup(tmp_path, dtype=dtype)
    mapper = JointSpaceMapper({n: t.out_channels for n, t in tasks.items()}, filters=model.filters)
    mapper.to(dtype)
    # Make FiLM non-trivial so a wrong pair index would show.
    with torch.no_grad():
        for p in mapper.film_parameters():
            p.add_(0.3 * torch.randn_like(p))
    loss = XTCLoss(tasks, mapper, reg_weight)
    labelled = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 1], [1, 1, 1], [0, 0, 0]], dtype=bool)
    feature = out.features["encoder"]
    batched = loss.consistency(out.preds, targets, feature, labelled, _soft)
    reference = loss.reference_consistency(out.preds, targets, feature, labelled, _soft)
    torch.testing.assert_close(batched, reference, rtol=tol, atol=tol)
    assert batched[4] == 0 and (batched[:4] > 0).all()
    params = [*model.parameters(), *mapper.parameters()]
    g_batched = torch.autograd.grad(batched.mean(), params, retain_graph=True, allow_unused=True)
    g_reference = torch.autograd.grad(reference.mean(), params, allow_unused=True)
    total = torch.stack([g.norm() for g in g_reference if g is not None]).norm()
    for a, b in zip(g_batched, g_reference, strict=True):
        if a is None or b is None:
            assert a is None and b is None
            continue
        # Conv biases feeding a normalisation have a true gradient of 0: compare them on the
        # scale of the whole gradient, not on their own (pure round-off) scale.
        scale = torch.maximum(b.norm(), 1e-3 * total)
        assert (a - b).norm() <= grad_tol * scale, float((a - b).norm() / scale)


def test_regulariser_target_gets_no_gradient(tmp_path):
    tasks, model, out, targets = _setup(tmp_path)
    mapper = JointSpaceMapper({n: t.out_channels for n, t in tasks.items()}, filters=model.filters)
    # A separate leaf, so only the regulariser's own use of the feature could reach it.
    feature = out.features["encoder"].detach().clone().requires_grad_(True)
    labelled = torch.tensor([[1, 0, 0]] * 5, dtype=bool)
    value = XTCLoss(tasks, mapper, 0.5).consistency(out.preds, targets, feature, labelled, _soft)
    (g,) = torch.autograd.grad(value.sum(), [feature], allow_unused=True)
    assert g is None or g.abs().sum() == 0


def test_gumbel_encoding_is_one_hot_with_gradient():
    task = SegmentationTask("semantic", num_classes=5)
    logits = torch.randn(2, 5, 4, 4, requires_grad=True)
    sample = task.encode_pred(F.log_softmax(logits, 1))
    assert torch.equal(sample.sum(1), torch.ones(2, 4, 4))
    assert set(sample.unique().tolist()) <= {0, 1}
    sample[:, 0].sum().backward()
    assert logits.grad.abs().sum() > 0


def _xtc(tasks, **options):
    return build_method("xtc", tasks, options)


def test_optimiser_groups_and_ablations(tmp_path):
    tasks, model, _, _ = _setup(tmp_path)
    method = _xtc(tasks)
    method.attach(model)
    groups = method.optimizer_groups(model)
    assert [g.name for g in groups] == ["main", "film"]
    assert (groups[1].lr, groups[1].step_size, groups[1].gamma) == (1e-3, 30, 0.5)
    film = {id(p) for p in groups[1].params}
    assert not any(id(p) in film for p in groups[0].params)
    plain = _xtc(tasks, conditioned=False, regularize=False)
    plain.attach(model)
    assert [g.name for g in plain.optimizer_groups(model)] == ["main"]
    assert plain.loss_fn.reg_weight == 0.0


def test_con_weight_ramp_up(tmp_path):
    tasks, _, _, _ = _setup(tmp_path)
    method = _xtc(tasks, con_weight=2.0, rampup_epochs=4)
    weights = []
    for epoch in range(6):
        method.on_epoch_start(epoch, 6)
        weights.append(method.weight_now)
    assert weights == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]


def test_xtc_needs_a_shared_encoder(tmp_path):
    from mtpsl.errors import ConfigError
    from mtpsl.models import PerTaskModels

    tasks, model, _, _ = _setup(tmp_path)
    with pytest.raises(ConfigError, match="shared encoder"):
        _xtc(tasks).attach(PerTaskModels({"semantic": model}))


@pytest.mark.parametrize("options", ["{}", "{conditioned: false}", "{regularize: false}"])
@pytest.mark.parametrize("regime", ["onelabel", "full"])
def test_xtc_trains_end_to_end_from_the_cli(tmp_path, options, regime):
    root = make_layout(tmp_path, n=4, h=32, w=48)
    run = tmp_path / "run"
    code = main(["train", "--run-dir", str(run), f"dataset.root={root}", "method.name=xtc",
                 f"method.options={options}", f"labels.regime={regime}", "model.width=0.0625",
                 "train.epochs=1", "train.batch_size=2", "train.progress=false"])
    assert code == 0
    final = json.loads((run / "final_metrics.json").read_text())
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["train/xtc"] > 0
    assert final["method"] == "xtc"
