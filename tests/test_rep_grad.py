"""Gradient weightings on the shared representation (``method.weighting_gradients``, MGDA-UB).

The strategy takes the task gradients with respect to the map every head reads (SegNet's
decoder output) and must then apply ``sum_k alpha_k dL_k/dtheta`` to the shared parameters,
with ``alpha`` computed from those representation gradients. Checked against an independent
computation: the representation gradients and their Gram matrix by autograd here, the
coefficients from a twin strategy, the expected parameter gradients by a full backward of
``sum_k alpha_k L_k`` (so the two-root backward pass and the chain rule through the cut are
both tested), float64, with a task absent from the batch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtpsl.cli import main
from mtpsl.core.errors import ConfigError
from mtpsl.models import build_model, shared_parameters
from mtpsl.tasks import build_task
from mtpsl.weighting import WEIGHTINGS, GradientContext, build_weighting

from conftest import TINY, final_metrics, train_cli

TASKS = {"semantic": build_task("segmentation", "semantic", num_classes=5),
         "depth": build_task("depth", "depth"), "normal": build_task("normal", "normal")}
NAMES = tuple(TASKS)
ABLE = [n for n in WEIGHTINGS.names() if WEIGHTINGS.get(n).supports_representation()]


def _problem():
    torch.manual_seed(0)
    from mtpsl.models import HeadSpec

    heads = {n: HeadSpec(t.out_channels, t.activate) for n, t in TASKS.items()}
    model = build_model("segnet", heads, width=0.0625).double().train()
    g = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 32, 48, generator=g, dtype=torch.float64)
    targets = {"semantic": torch.randint(0, 5, (2, 32, 48), generator=g),
               "depth": torch.rand(2, 1, 32, 48, generator=g, dtype=torch.float64) + 0.5,
               "normal": torch.nn.functional.normalize(
                   torch.randn(2, 3, 32, 48, generator=g, dtype=torch.float64), dim=1)}
    return model, image, targets


def _losses(model, image, targets, present):
    out = model(image)
    losses = {n: TASKS[n].loss(out.preds[n], targets[n]).mean() * (1.0 if present[i] else 0.0)
              for i, n in enumerate(NAMES)}
    return losses, out.features["shared"]


@pytest.mark.parametrize("name", ABLE)
@pytest.mark.parametrize("present", [(True, True, True), (True, False, True)])
def test_the_shared_update_is_alpha_from_representation_gradients(name, present):
    options = {"seed": 3} if "seed" in WEIGHTINGS.get(name).Options.model_fields else {}
    strategy = build_weighting(name, NAMES, options, "representation").double()
    twin = build_weighting(name, NAMES, options).double()
    model, image, targets = _problem()
    shared = shared_parameters(model)
    rest = [p for p in model.parameters() if all(p is not s for s in shared)]
    flags = torch.tensor(present)
    indices = [i for i, f in enumerate(present) if f]

    losses, z = _losses(model, image, targets, present)
    strategy.backward(losses, torch.zeros((), dtype=torch.float64),
                      GradientContext(flags, shared, representation=z))
    got = [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
           for p in model.parameters()]

    model.zero_grad()
    losses, z = _losses(model, image, targets, present)
    stacked = torch.stack([losses[NAMES[i]] for i in indices])
    rep = torch.stack([torch.autograd.grad(loss, z, retain_graph=True)[0].reshape(-1)
                       for loss in stacked])
    alpha = twin.coefficients((rep @ rep.T).numpy(), stacked.detach().numpy(), indices)
    alpha_t = torch.as_tensor(alpha, dtype=torch.float64)
    head_w = alpha_t if twin.heads_follow else torch.ones_like(alpha_t)
    expected_shared = torch.autograd.grad((alpha_t * stacked).sum(), shared, retain_graph=True,
                                          allow_unused=True)
    expected_rest = torch.autograd.grad((head_w * stacked).sum(), rest, allow_unused=True)
    expected = dict(zip(map(id, shared), expected_shared, strict=True)) | dict(
        zip(map(id, rest), expected_rest, strict=True))
    for p, g in zip(model.parameters(), got, strict=True):
        want = expected[id(p)]
        want = torch.zeros_like(p) if want is None else want
        torch.testing.assert_close(g, want, rtol=1e-7, atol=1e-10)


def test_mgda_ub_takes_the_two_task_min_norm_point_of_the_representation_gradients():
    """Closed form for two tasks: alpha_1 = clip((g2 - g1).g2 / |g1 - g2|^2, 0, 1)."""
    model, image, targets = _problem()
    present = (True, False, True)
    losses, z = _losses(model, image, targets, present)
    g1, g3 = (torch.autograd.grad(losses[n], z, retain_graph=True)[0].reshape(-1)
              for n in ("semantic", "normal"))
    a1 = float(torch.clamp((g3 - g1) @ g3 / ((g1 - g3) @ (g1 - g3)), 0, 1))
    want = torch.autograd.grad(a1 * losses["semantic"] + (1 - a1) * losses["normal"],
                               list(model.parameters()), retain_graph=True, allow_unused=True)
    strategy = build_weighting("mgda_ub", NAMES)
    assert strategy.gradients == "representation"
    strategy.backward(losses, torch.zeros((), dtype=torch.float64),
                      GradientContext(torch.tensor(present), shared_parameters(model),
                                      representation=z))
    for p, w in zip(model.parameters(), want, strict=True):
        w = torch.zeros_like(p) if w is None else w
        g = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-10)
    assert 0.0 < a1 < 1.0  # the problem is not decided by one task alone


def test_strategies_that_cannot_use_the_representation_are_refused_by_name():
    refused = [n for n in WEIGHTINGS.names() if n not in ABLE]
    assert {"graddrop", "config", "nash_mtl", "db_mtl", "uniform"} <= set(refused)
    assert {"mgda", "pcgrad", "cagrad", "upgrad", "mgda_ub"} <= set(ABLE)
    for name in ("graddrop", "nash_mtl", "uniform"):
        with pytest.raises(ConfigError, match=r"method\.weighting_gradients.*mgda") as err:
            build_weighting(name, NAMES, None, "representation")
        assert repr(name) in str(err.value)
    with pytest.raises(ConfigError, match=r"method\.weighting_gradients: 'mgda_ub'"):
        build_weighting("mgda_ub", NAMES, None, "parameters")
    assert build_weighting("mgda", NAMES, None, "parameters").gradients == "parameters"


ARGS = [*TINY, "train.eval_every=1"]


@pytest.mark.parametrize("extra", [
    ["method.weighting=mgda_ub"],
    ["method.weighting=pcgrad", "method.weighting_gradients=representation", "model.name=dense",
     "model.backbone.depth=18"],
    ["method.weighting=cagrad", "method.weighting_gradients=representation",
     "method.name=xtc"],
], ids=["mgda_ub-segnet", "pcgrad-dense", "cagrad-xtc"])
def test_trains_from_the_cli(tiny_root, tmp_path, extra):
    final = final_metrics(train_cli(tmp_path / "run", tiny_root, *ARGS, *extra))
    assert np.isfinite(list(final["metrics"].values())).all()


def test_a_model_without_one_shared_map_is_a_config_error(tiny_root, tmp_path, capsys):
    code = main(["train", "--run-dir", str(tmp_path / "run"), f"dataset.root={tiny_root}", *ARGS,
                 "method.weighting=mgda_ub", "model.name=mtan"])
    assert code == 2
    err = capsys.readouterr().err
    assert "method.weighting_gradients" in err and "'parameters'" in err
    code = main(["train", "--run-dir", str(tmp_path / "bad"), f"dataset.root={tiny_root}", *ARGS,
                 "method.weighting_gradients=features"])
    assert code == 2
    assert "representation" in capsys.readouterr().err
