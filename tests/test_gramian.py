"""Gram-based weightings from torchjd's autogram engine (``method.weighting_gradients=gramian``).

The engine must give the Gram matrix of the shared parameters' task gradients without
forming them, and the strategy must then update exactly as its parameter form does. Checked
against independent computations in float64: the Gram matrix against ``G G^T`` of gradients
taken one task at a time by autograd (SegNet, MTAN, a ResNet dense model with BatchNorm, a
timm ConvNeXt with LayerNorm), every parameter's gradient against the same strategy on the
parameters (whose own tests check it against torchjd and closed forms), with a task absent,
and after a step with no task at all (the engine's forward-call count must not leak into the
next step).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from mtpsl.core.distributed import DistEnv
from mtpsl.core.errors import ConfigError
from mtpsl.engine.step import gramian_engine
from mtpsl.models import HeadSpec, PerTaskModels, build_model, shared_parameters
from mtpsl.models.encoders import EncoderSpec
from mtpsl.weighting import WEIGHTINGS, GradientContext, build_weighting
from mtpsl.weighting.gradient import flat_grad
from mtpsl.weighting.gramian import SharedGramian, owning_layers
from test_rep_grad import NAMES, TASKS, _losses, _problem

from conftest import TINY, final_metrics, train_cli

ABLE = [n for n in WEIGHTINGS.names()
        if WEIGHTINGS.get(n).supports_representation() and WEIGHTINGS.get(n).gradients
        == "parameters"]
ZERO = torch.zeros((), dtype=torch.float64)


def _options(name: str) -> dict:
    return {"seed": 3} if "seed" in WEIGHTINGS.get(name).Options.model_fields else {}


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("model_name, kwargs", [
    ("segnet", {"width": 0.0625}), ("mtan", {"width": 0.0625}),
    ("dense", {"backbone": EncoderSpec(depth=18, output_stride=16)}),
    ("dense", {"backbone": EncoderSpec(name="timm", arch="convnext_atto", output_stride=32)}),
], ids=["segnet", "mtan", "resnet", "timm-convnext"])
def test_the_gram_matrix_is_that_of_the_task_gradients(model_name, kwargs):
    torch.manual_seed(0)
    heads = {n: HeadSpec.of(t) for n, t in TASKS.items()}
    model = build_model(model_name, heads, **kwargs).double().train()
    shared = shared_parameters(model)
    gramian = SharedGramian(model, shared)
    _, image, targets = _problem()
    preds = model(image).preds
    stacked = torch.stack([TASKS[n].loss(preds[n], targets[n]).mean() for n in NAMES])
    gram = gramian(stacked)
    grads = torch.stack([flat_grad(loss, shared) for loss in stacked])
    torch.testing.assert_close(gram, grads @ grads.T, rtol=1e-9, atol=1e-12)
    assert {id(p) for layer in gramian.layers for p in layer.parameters()} == set(map(id, shared))


@pytest.mark.parametrize("name", ABLE)
@pytest.mark.parametrize("present", [(True, True, True), (True, False, True)])
def test_every_gram_strategy_updates_as_on_the_parameters(name, present):
    outcome = {}
    for gradients in ("parameters", "gramian"):
        strategy = build_weighting(name, NAMES, _options(name), gradients).double()
        model, image, targets = _problem()
        shared = shared_parameters(model)
        gramian = SharedGramian(model, shared) if gradients == "gramian" else None
        losses, _ = _losses(model, image, targets, present)
        strategy.backward(losses, ZERO, GradientContext(torch.tensor(present), shared,
                                                        gramian=gramian))
        outcome[gradients] = (_grads(model), strategy.state_dict())
    for got, want in zip(*(outcome[g][0] for g in ("gramian", "parameters")), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
    assert outcome["gramian"][1].keys() == outcome["parameters"][1].keys()


def test_a_step_without_tasks_leaves_no_count_behind():
    """The engine counts forward calls until it computes a Gram matrix; a step with no task
    present computes none, and the next step must still get the true Gram matrix."""
    model, image, targets = _problem()
    shared = shared_parameters(model)
    gramian = SharedGramian(model, shared)
    strategy = build_weighting("mgda", NAMES, None, "gramian").double()
    losses, _ = _losses(model, image, targets, (False, False, False))
    strategy.backward(losses, ZERO, GradientContext(torch.tensor([False] * 3), shared,
                                                    gramian=gramian))
    model.zero_grad()
    losses, _ = _losses(model, image, targets, (True, True, True))
    strategy.backward(losses, ZERO, GradientContext(torch.tensor([True] * 3), shared,
                                                    gramian=gramian))
    got = _grads(model)
    twin = build_weighting("mgda", NAMES).double()
    model.zero_grad()
    losses, _ = _losses(model, image, targets, (True, True, True))
    twin.backward(losses, ZERO, GradientContext(torch.tensor([True] * 3), shared))
    for g, w in zip(got, _grads(model), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-10)


class _TwoCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 3)
        self.heads = nn.ModuleList([nn.Linear(3, 1), nn.Linear(3, 1)])


def test_a_forward_pass_no_task_loss_reads_is_a_named_error():
    net = _TwoCalls().double()
    gramian = SharedGramian(net, list(net.body.parameters()))
    x = torch.randn(4, 3, dtype=torch.float64)
    features, unread = net.body(x), net.body(x + 1)  # a second view only another term reads
    losses = torch.stack([h(features).pow(2).mean() for h in net.heads])
    with pytest.raises(ConfigError, match=r"weighting_gradients: 'gramian'.*'parameters'"):
        gramian(losses + 0 * unread.detach().sum())


def test_shared_parameters_that_are_not_whole_layers_are_refused():
    net = _TwoCalls()
    with pytest.raises(ConfigError, match=r"cannot separate Linear"):
        owning_layers(net, [net.body.weight])  # its bias is not shared
    assert owning_layers(net, list(net.body.parameters())) == [net.body]
    net.heads[0].tied = net.body  # one layer under two parents (tied weights): hooked once
    assert owning_layers(net, list(net.body.parameters())) == [net.body]


def test_torchrun_compile_and_models_without_shared_parameters_are_refused():
    heads = {n: HeadSpec.of(t) for n, t in TASKS.items()}
    model = build_model("segnet", heads, width=0.0625)

    def exp(compile_: bool = False, net: nn.Module = model):
        return SimpleNamespace(weighting=SimpleNamespace(gradients="gramian"), model=net,
                               config=SimpleNamespace(train=SimpleNamespace(compile=compile_)))

    with pytest.raises(ConfigError, match="torchrun"):
        gramian_engine(exp(), DistEnv(rank=0, world=2))
    with pytest.raises(ConfigError, match=r"train\.compile"):
        gramian_engine(exp(compile_=True), DistEnv())
    assert isinstance(gramian_engine(exp(), DistEnv()), SharedGramian)
    stl = PerTaskModels({n: build_model("segnet", {n: h}, width=0.0625) for n, h in heads.items()})
    with pytest.raises(ConfigError, match="needs shared parameters; PerTaskModels has none"):
        gramian_engine(exp(net=stl), DistEnv())
    for name in ("uniform", "graddrop", "mgda_ub"):
        with pytest.raises(ConfigError, match=r"method\.weighting_gradients"):
            build_weighting(name, NAMES, None, "gramian")


@pytest.mark.parametrize("method", ["sl", "xtc", "mean_teacher"])  # one, pairs, two views
def test_trains_from_the_cli(tiny_root, tmp_path, method):
    run = train_cli(tmp_path / "run", tiny_root, *TINY, "train.eval_every=1",
                    f"method.name={method}", "method.weighting=pcgrad",
                    "method.weighting_gradients=gramian")
    final = final_metrics(run)
    assert np.isfinite(list(final["metrics"].values())).all()
    config = (run / "config.yaml").read_text()
    assert "weighting_gradients: gramian" in config


def test_a_compare_variant_chooses_what_its_strategy_differentiates():
    from mtpsl.analysis.compare import cell_config_for
    from mtpsl.core.config import load_config

    variants = ("compare.variants={mgda_gram: {method: sl, weighting: mgda, weighting_gradients:"
                " gramian}, pcgrad: {method: sl, weighting: pcgrad}}")
    base = load_config("synthetic_demo", ["method.weighting=mgda",
                                          "method.weighting_gradients=representation", variants])
    assert cell_config_for(base, "full", "mgda_gram", 0).method.weighting_gradients == "gramian"
    other = cell_config_for(base, "full", "pcgrad", 0).method  # another strategy: its default
    assert (other.weighting, other.weighting_gradients) == ("pcgrad", None)
    assert cell_config_for(base, "full", "sl", 0).method.weighting_gradients == "representation"
