"""contrastive / discriminator (paper 001, Sec. 3.2): XTC's joint space with another loss."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mtpsl.cli import main
from mtpsl.data import DATASETS
from mtpsl.errors import ConfigError
from mtpsl.methods import build_method
from mtpsl.methods.joint_alternatives import contrastive_consistency, discriminator_terms
from mtpsl.methods.joint_space import pair_index
from mtpsl.models import HeadSpec, build_model
from mtpsl.tasks import SegmentationTask

from conftest import make_layout

LABELLED = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 1], [1, 1, 1], [0, 0, 0]], dtype=bool)


def _soft(task, x):
    # Deterministic stand-in for the Gumbel sample, so both forms see identical inputs.
    return x.exp() if isinstance(task, SegmentationTask) else task.encode_pred(x)


def _setup(tmp_path, name, n=5, dtype=torch.float32, **options):
    ds = DATASETS.get("nyuv2")(make_layout(tmp_path, n=n, h=32, w=64), "train")
    tasks = ds.tasks
    torch.manual_seed(0)
    heads = {k: HeadSpec(t.out_channels, t.activate) for k, t in tasks.items()}
    model = build_model("segnet", heads, width=0.0625).to(dtype)
    method = build_method(name, tasks, options)
    method.attach(model)
    method.to(dtype)
    with torch.no_grad():  # non-trivial FiLM, so a wrong pair code would show
        for p in method.loss_fn.mapper.film_parameters():
            p.add_(0.3 * torch.randn_like(p))
    targets = {k: torch.stack([ds[i][k] for i in range(n)]) for k in tasks}
    targets = {k: v.to(dtype) if v.is_floating_point() else v for k, v in targets.items()}
    out = model(torch.stack([ds[i]["image"] for i in range(n)]).to(dtype))
    return tasks, model, method, out, targets


def _loop_contrastive(tasks, mapper, preds, targets, labelled, margin, normalize="sum"):
    """Per image, per row, per other image j: batch-1 mapping passes, no shared code;
    ``normalize="mean"`` divides an image's rows by their number."""
    names = list(tasks)
    k, n = len(names), labelled.shape[0]
    per_image = []
    for i in range(n):
        lab = [bool(v) for v in labelled[i]]
        total = torch.zeros((), dtype=preds[names[0]].dtype)
        n_rows = 0
        for s in range(k):
            for t in range(k):
                if s == t or not lab[t] or (lab[s] and not all(lab)):
                    continue
                pair = pair_index(s, t, k)
                y_t = tasks[names[t]].encode_target(targets[names[t]][i : i + 1])
                m_t = mapper.reference_forward(names[t], y_t, pair)

                def dist(j, s=s, pair=pair, m_t=m_t):
                    x = _soft(tasks[names[s]], preds[names[s]][j : j + 1])
                    m_s = mapper.reference_forward(names[s], x, pair)
                    cos = torch.nn.functional.cosine_similarity(m_s, m_t, dim=1, eps=1e-8)
                    return 1.0 - cos.mean()

                if n < 2:
                    continue
                d_pos = dist(i)
                hinges = [torch.relu(margin + d_pos - dist(j)) for j in range(n) if j != i]
                total = total + torch.stack(hinges).mean()
                n_rows += 1
        per_image.append(total / n_rows if normalize == "mean" and n_rows else total)
    return torch.stack(per_image)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("margin", [0.5, 2.0])
def test_contrastive_equals_a_per_row_loop(tmp_path, dtype, tol, margin):
    tasks, _, method, out, targets = _setup(tmp_path, "contrastive", dtype=dtype)
    mapper = method.loss_fn.mapper
    batched = contrastive_consistency(method.loss_fn, out.preds, targets, LABELLED, margin, _soft)
    loop = _loop_contrastive(tasks, mapper, out.preds, targets, LABELLED, margin)
    torch.testing.assert_close(batched, loop, rtol=tol, atol=tol)
    assert batched[4] == 0 and (batched[:4] > 0).all()
    if margin == 2.0:  # distances lie in [0, 2]: every hinge is active, the loss is linear
        params = [*mapper.parameters()]
        g = torch.autograd.grad(batched.sum(), params, allow_unused=True)
        assert any(x is not None and x.abs().sum() > 0 for x in g)


def test_contrastive_normalize_mean_divides_by_the_rows_of_each_image(tmp_path):
    tasks, _, method, out, targets = _setup(tmp_path, "contrastive", dtype=torch.float64)
    mapper = method.loss_fn.mapper
    args = (method.loss_fn, out.preds, targets, LABELLED, 2.0, _soft)
    mean = contrastive_consistency(*args, normalize="mean")
    loop = _loop_contrastive(tasks, mapper, out.preds, targets, LABELLED, 2.0, "mean")
    torch.testing.assert_close(mean, loop, rtol=1e-10, atol=1e-10)
    total = contrastive_consistency(*args)
    assert mean[4] == 0 and torch.all(mean[:4] < total[:4])  # every image has 2+ rows


def test_contrastive_batch_of_one_has_no_negatives(tmp_path):
    _, _, method, out, targets = _setup(tmp_path, "contrastive", n=1)
    for labelled in ([[1, 0, 0]], [[1, 1, 1]]):
        value = contrastive_consistency(method.loss_fn, out.preds, targets,
                                        torch.tensor(labelled, dtype=bool), 0.5, _soft)
        assert value.shape == (1,) and value.item() == 0.0
    d_term, g_term = discriminator_terms(method.loss_fn, torch.nn.Identity(), out.preds, targets,
                                         torch.tensor([[1, 0, 0]], dtype=bool), _soft)
    assert d_term.item() == 0.0 and g_term.item() == 0.0


def _grads(value, params):
    return list(torch.autograd.grad(value, params, retain_graph=True, allow_unused=True))


def _nonzero(grads):
    return any(g is not None and g.abs().sum() > 0 for g in grads)


def test_discriminator_terms_train_disjoint_parameters(tmp_path):
    _, model, method, out, targets = _setup(tmp_path, "discriminator")
    d_term, g_term = discriminator_terms(method.loss_fn, method.disc, out.preds, targets,
                                         LABELLED, _soft)
    assert d_term > 0 and g_term > 0
    disc = list(method.disc.parameters())
    net, mapper = list(model.parameters()), list(method.loss_fn.mapper.parameters())
    # The D term reaches D only (its inputs are detached) ...
    assert _nonzero(_grads(d_term, disc))
    assert d_term.grad_fn is not None
    assert not _nonzero(_grads(d_term, net + mapper))
    # ... the network term reaches the SegNet and the mapper, never D (frozen parameters).
    assert all(g is None for g in _grads(g_term, disc))
    assert _nonzero(_grads(g_term, net)) and _nonzero(_grads(g_term, mapper))
    # Both see the same logits: with D's parameters shared, the two BCEs are equal in value.
    torch.testing.assert_close(d_term, g_term)


def test_discriminator_architecture_and_optimiser_groups(tmp_path):
    _, model, method, _, _ = _setup(tmp_path, "discriminator")
    f = method.loss_fn.mapper.out_channels
    convs = [m for m in method.disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(2 * f, f), (f, f // 2)]
    assert method.disc(torch.rand(3, f, 1, 2), torch.rand(3, f, 1, 2)).shape == (3,)
    groups = method.optimizer_groups(model)
    assert [g.name for g in groups] == ["main", "film", "discriminator"]
    assert (groups[2].lr, groups[2].step_size, groups[2].gamma) == (1e-4, None, None)
    ids = [{id(p) for p in g.params} for g in groups]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert ids[2] == {id(p) for p in method.disc.parameters()}
    assert set().union(*ids) >= {id(p) for p in method.parameters()}
    assert "disc.body.0.weight" in method.state_dict()


def test_options_and_ramp_up(tmp_path):
    ds = DATASETS.get("nyuv2")(make_layout(tmp_path, n=1), "train")
    method = build_method("contrastive", ds.tasks, {"rampup_epochs": 2, "margin": 0.2})
    weights = []
    for epoch in range(3):
        method.on_epoch_start(epoch, 3)
        weights.append(method.weight_now)
    assert weights == [1.0, 2.0, 2.0] and method.options.margin == 0.2
    assert build_method("discriminator", ds.tasks, {}).options.disc_lr == 1e-4
    with pytest.raises(ConfigError, match="reg_weight"):
        build_method("contrastive", ds.tasks, {"reg_weight": 0.5})
    with pytest.raises(ConfigError, match="method discriminator needs at least two tasks"):
        build_method("discriminator", {"depth": ds.tasks["depth"]}, {})


@pytest.mark.parametrize(("name", "keys"), [("contrastive", ["contrastive"]),
                                            ("discriminator", ["disc", "disc_gen"])])
def test_trains_end_to_end_from_the_cli(tmp_path, name, keys):
    root = make_layout(tmp_path, n=4, h=32, w=64)
    run = tmp_path / "run"
    code = main(["train", "--run-dir", str(run), f"dataset.root={root}", f"method.name={name}",
                 "model.width=0.0625", "train.epochs=1", "train.batch_size=2",
                 "train.progress=false"])
    assert code == 0
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    for key in keys:
        assert math.isfinite(rows[0][f"train/{key}"]) and rows[0][f"train/{key}"] > 0
    assert json.loads((run / "final_metrics.json").read_text())["method"] == name
