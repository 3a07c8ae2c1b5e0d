"""Every registered entry of every registry keeps its contract on tiny CPU inputs (in the manner
of smp's BaseModelTester and timm's per-model tests): a new task, model, encoder, method,
weighting or metric file is covered here without writing a test for the contract itself.

No entry is named here: the tests parametrise over the registries, and an entry that needs
construction arguments to be small gives them itself through its contract's hook
(``Task.contract_options``, ``Metric.contract_task``, ``Encoder.contract_spec``,
``Method.contract_options``); ``tests/test_extending.py`` checks that a new file is picked up
and that a broken one fails here."""

from __future__ import annotations

import inspect
import math
import typing

import numpy as np
import pytest
import torch

from mtpsl.core.errors import ConfigError
from mtpsl.core.render import OutputFiles
from mtpsl.data import DATASETS
from mtpsl.data.batch import PartialLabelSet, collate
from mtpsl.data.splits import make_split
from mtpsl.data.transforms import build_train_transform
from mtpsl.methods import METHODS, build_method
from mtpsl.metrics import METRICS
from mtpsl.models import MODELS, HeadSpec, MultiTaskModel, build_model, shared_parameters
from mtpsl.models.encoders import ENCODERS, Encoder, EncoderSpec, build_encoder
from mtpsl.tasks import TASKS, Task, build_task
from mtpsl.weighting import WEIGHTINGS, GradientContext, build_weighting

from conftest import NYU_HEADS, make_layout, representation_of

H, W = 64, 96


def _task(kind: str, **options) -> Task:
    """A small instance of a registered task type (its ``contract_options``, then ``options``)."""
    return build_task(kind, "t", **{**TASKS.get(kind).contract_options, **options})


def _label_like(task: Task, b: int = 2) -> torch.Tensor:
    """A label in the task's batch format: its own hard label of a random prediction."""
    raw = torch.randn(b, task.out_channels, H, W, generator=torch.Generator().manual_seed(0))
    return task.hard_label(task.activate(raw))


# --- tasks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TASKS.names())
def test_task_contract(kind, tmp_path):
    task = _task(kind)
    raw = torch.randn(2, task.out_channels, H, W, requires_grad=True)
    pred = task.activate(raw)
    target = _label_like(task)
    loss = task.loss(pred, target)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    loss.sum().backward()
    assert raw.grad is not None
    assert task.valid(target).shape == (2, H, W)
    assert not task.valid(task.blank_like(target)).any()
    assert task.encode_pred_eval(pred.detach()).shape == task.encode_target(target).shape
    assert task.label_map(target).shape == task.as_map(pred.detach()).shape
    assert task.distance(pred.detach(), pred.detach()).shape == (2,)
    assert task.after_interpolation(target).shape == target.shape
    assert task.critic_input(pred.detach()).shape[0] == 2
    cells = task.panels(target[0], [pred[0].detach(), pred[1].detach()])
    assert len(cells) == 3 and all(np.asarray(c[0]).shape[:2] == (H, W) for c in cells)
    assert len(task.panels(None, [pred[0].detach()])) == 1
    array = task.finalise(pred[0].detach())
    assert array.shape[:2] == (H, W)
    files = OutputFiles(tmp_path, "img")
    task.save_prediction(array, files)
    assert files.written and all(p.is_file() for p in files.written)
    assert task.metric in METRICS
    assert task.primary_metric in METRICS.get(task.metric).higher_is_better


# --- metrics --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TASKS.names())
def test_metric_of_every_task_type(kind):
    task = _task(kind)
    metric = METRICS.get(task.metric)(**task.metric_kwargs())
    target = _label_like(task)
    metric.update(task.activate(torch.randn(2, task.out_channels, H, W)), target)
    result = metric.compute()
    assert set(METRICS.get(task.metric).higher_is_better) <= set(result)
    assert all(isinstance(v, float) for v in result.values())


def _task_scored_by(name: str) -> Task:
    """The task whose predictions and labels metric ``name`` is checked on: its
    ``contract_task``, else the task type whose ``metric`` names it."""
    declared = METRICS.get(name).contract_task
    if declared is not None:
        return _task(declared[0], **declared[1])
    kinds = [k for k in TASKS.names() if TASKS.get(k).metric == name]
    assert kinds, (f"metric {name!r}: no task type names it as its metric; set its "
                   f"contract_task to the task type (and options) it scores")
    return _task(kinds[0])


@pytest.mark.parametrize("name", METRICS.names())
def test_metric_contract(name):
    """Every metric, also those no task type uses by default: float results with every
    declared key, and accumulators that combine by a sum (what ``all_reduce(SUM)`` does across
    processes): two halves summed score as the whole set."""
    task = _task_scored_by(name)
    cls = METRICS.get(name)
    raw = torch.randn(4, task.out_channels, H, W, generator=torch.Generator().manual_seed(1))
    pred, target = task.activate(raw), _label_like(task, b=4)
    whole = cls(**task.metric_kwargs())
    whole.update(pred, target)
    result = whole.compute()
    assert set(cls.higher_is_better) <= set(result)
    assert all(isinstance(v, float) for v in result.values())
    first, second = cls(**task.metric_kwargs()), cls(**task.metric_kwargs())
    first.update(pred[:2], target[:2])
    second.update(pred[2:], target[2:])
    for mine, other in zip(first.state_tensors(), second.state_tensors(), strict=True):
        mine.add_(other)
    assert first.compute() == pytest.approx(result, rel=1e-9, abs=1e-12, nan_ok=True)


# --- encoders and models --------------------------------------------------------------------


def _encoder_spec(name: str) -> EncoderSpec:
    """The encoder's own small spec: ``contract_spec`` of the class its builder returns."""
    try:
        cls = typing.get_type_hints(ENCODERS.get(name)).get("return")
    except NameError:  # an annotation that names what its module only imports to type-check
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, Encoder)):
        cls = Encoder
    return cls.contract_spec(name)


@pytest.mark.parametrize("name", ENCODERS.names())
def test_encoder_contract(name):
    enc = build_encoder(_encoder_spec(name))
    maps = enc(torch.zeros(1, 3, H + 1, W - 1))
    assert [m.shape[1] for m in maps] == list(enc.channels)
    assert len(enc.reductions) == len(maps)
    assert enc.feature_size(H + 1, W - 1) == tuple(maps[-1].shape[-2:])


def _build(name: str, heads=NYU_HEADS):
    build = MODELS.get(name)
    kwargs = {"width": 0.0625}
    if "backbone" in inspect.signature(build).parameters:
        kwargs["backbone"] = EncoderSpec(depth=18, output_stride=32)
    torch.manual_seed(0)
    return build_model(name, heads, **kwargs)


@pytest.mark.parametrize("name", MODELS.names())
def test_model_contract(name):
    model = _build(name)
    assert isinstance(model, MultiTaskModel) and model.tasks == list(NYU_HEADS)
    out = model(torch.zeros(2, 3, H, W))
    assert {k: tuple(v.shape) for k, v in out.preds.items()} == {
        k: (2, h.channels, H, W) for k, h in NYU_HEADS.items()}
    shared = shared_parameters(model)
    assert shared and {id(p) for p in shared} <= {id(p) for p in model.parameters()}
    info = model.encoder_info
    if info is not None:
        assert out.features["encoder"].shape[1:] == (info.channels, *info.size(H, W))
    total = sum(v.float().mean() for v in out.preds.values())
    total.backward()
    assert all(p.grad is not None for p in shared)


# --- methods --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_layout(tmp_path_factory.mktemp("data"), n=4, h=H, w=W)


def _method_and_data(name, root):
    layout = DATASETS.get("nyuv2")(root, "train")
    options = METHODS.get(name).contract_options
    try:
        return build_method(name, layout.tasks, options), layout
    except ConfigError:  # e.g. xtask: exactly one segmentation and one depth task
        layout = DATASETS.get("nyuv2")(root, "train", tasks=("semantic", "depth"))
        return build_method(name, layout.tasks, options), layout


@pytest.mark.parametrize("name", METHODS.names())
def test_method_contract(name, root):
    method, layout = _method_and_data(name, root)
    tasks = dict(layout.tasks)
    heads = {n: HeadSpec(t.out_channels, t.activate) for n, t in tasks.items()}
    if method.per_task_networks:
        from mtpsl.models import PerTaskModels

        model = PerTaskModels({n: _build("segnet", {n: h}) for n, h in heads.items()})
    else:
        model = _build(method.contract_model, heads)
    method.attach(model)
    names = tuple(tasks)
    split = make_split("onelabel", len(layout), names, seed=0)
    items = PartialLabelSet(layout, tasks, split.labelled,
                            build_train_transform((1.0, 1.2), flip=True),
                            n_views=method.n_views, seed=0)
    batch = collate([items[i] for i in range(len(layout))], names)
    losses, out = method.compute(model, batch)
    assert set(losses.tasks) == set(names)
    terms = [*losses.tasks.values(), *losses.extra.values()]
    assert all(t.ndim == 0 and math.isfinite(float(t)) for t in terms)
    sum(terms).backward()
    groups = method.optimizer_groups(model)
    trained = [p for g in groups for p in g.params]
    assert all(p.requires_grad for p in trained)
    assert {id(p) for p in model.parameters()} <= {id(p) for p in trained}
    method.after_step(model)
    method.on_epoch_start(0, 2)
    assert set(out.preds) >= set(names)


# --- weightings -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", WEIGHTINGS.names())
def test_weighting_contract(name):
    torch.manual_seed(0)
    shared = torch.nn.Parameter(torch.randn(4))
    heads = [torch.nn.Parameter(torch.randn(4)) for _ in range(3)]
    names = ("a", "b", "c")
    weighting = build_weighting(name, names)
    z = shared * 1.0  # the representation the "heads" read
    losses = {n: ((z + h) ** 2).sum() * (k + 1) for k, (n, h) in
              enumerate(zip(names, heads, strict=True))}
    present = torch.tensor([True, False, True])
    losses["b"] = losses["b"] * 0.0  # absent: an exact 0
    total = weighting.backward(losses, torch.zeros(()), GradientContext(
        present, [shared], **representation_of(weighting, z)))
    assert math.isfinite(float(total))
    assert shared.grad is not None and torch.isfinite(shared.grad).all()
    assert heads[1].grad is None or not heads[1].grad.any()  # the absent task moves nothing
    weighting.end_epoch({"a": 1.0, "b": 1.0, "c": 1.0})
    assert isinstance(type(weighting).linear_in_losses, bool)


class _ToyProblem:
    """Losses ``s_k ||theta - c_k||^2 / 2 + h_k^2 + 0.1`` (positive, conflicting), stepped
    by plain SGD with whatever gradient the strategy applies."""

    def __init__(self, name: str, targets: torch.Tensor, scales: list[float],
                 names: tuple[str, ...]) -> None:
        self.names = names
        self.targets = targets
        self.scales = scales
        self.theta = torch.nn.Parameter(torch.zeros(4, 1, 1, 1, dtype=torch.float64))
        self.heads = torch.nn.Parameter(torch.ones(len(names), dtype=torch.float64))
        self.weighting = build_weighting(name, names).double()
        self.losses: dict[str, float] = {}

    def task_losses(self, present: list[bool]) -> dict[str, torch.Tensor]:
        losses = {}
        self.z = self.theta * 1.0  # the representation the "heads" read
        for k, (task, target) in enumerate(zip(self.names, self.targets, strict=True)):
            distance = 0.5 * ((self.z - target) ** 2).sum()
            value = self.scales[k] * distance + self.heads[k] ** 2 + 0.1
            losses[task] = value if present[k] else value * 0.0
        return losses

    def step(self, present: list[bool]) -> float:
        self.theta.grad = self.heads.grad = None
        losses = self.task_losses(present)
        self.losses = {t: float(v) for t, v, p in zip(self.names, losses.values(), present,
                                                       strict=True) if p}
        flags = torch.tensor(present)
        total = self.weighting.backward(losses, torch.zeros((), dtype=torch.float64),
                                        GradientContext(flags, [self.theta],
                                                        **representation_of(self.weighting,
                                                                            self.z)))
        with torch.no_grad():
            for p in (self.theta, self.heads):
                if p.grad is not None:
                    p -= 0.05 * p.grad
        if self.weighting.wants_losses_after_step:
            with torch.no_grad():
                self.weighting.after_step(self.task_losses(present), flags)
        return float(total)


@pytest.mark.parametrize("name", WEIGHTINGS.names())
def test_an_absent_task_is_as_if_it_did_not_exist(name):
    """With task b never labelled, the strategy built for (a, b, c) follows the path of the one
    built for (a, c) alone: the same totals and parameters, step after step, epoch ends
    included (stateful strategies are thereby checked not to let b disturb their state)."""
    if WEIGHTINGS.get(name).draws_per_step:
        pytest.skip("draws a weight for every task each step: tested in its own file")
    targets = torch.tensor(np.random.default_rng(0).normal(size=(3, 4, 1, 1, 1)))
    three = _ToyProblem(name, targets, [1.0, 2.0, 3.0], ("a", "b", "c"))
    two = _ToyProblem(name, targets[[0, 2]], [1.0, 3.0], ("a", "c"))
    for _ in range(6):
        t3, t2 = three.step([True, False, True]), two.step([True, True])
        assert t3 == pytest.approx(t2, rel=1e-9, abs=1e-12)
        torch.testing.assert_close(three.theta, two.theta, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(three.heads[[0, 2]], two.heads, rtol=1e-9, atol=1e-12)
        assert three.heads.grad is not None and three.heads.grad[1].item() == 0.0
        three.weighting.end_epoch(three.losses)
        two.weighting.end_epoch(two.losses)
