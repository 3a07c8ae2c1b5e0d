"""Loss-weighting strategies: toy problems with known answers, partial labels, and the CLI."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from mtpsl.analysis.compare import cell_config_for
from mtpsl.cli import main
from mtpsl.core.config import load_config
from mtpsl.engine.checkpoint import load_checkpoint
from mtpsl.weighting import (
    WEIGHTINGS,
    GradientContext,
    build_weighting,
    cagrad_coefficients,
    cagrad_dual,
    dwa_weights,
    min_norm_coefficients,
    pcgrad_coefficients,
    project_simplex,
)

from conftest import TINY, final_metrics, train_cli

ALL = ["uniform", "uncertainty", "gradnorm", "dwa", "mgda", "pcgrad", "cagrad"]


def _simplex_grid(k: int, n: int) -> np.ndarray:
    """Every point of the k-simplex with coordinates in multiples of 1/n."""
    pts = [c for c in itertools.product(range(n + 1), repeat=k - 1) if sum(c) <= n]
    return np.array([[*c, n - sum(c)] for c in pts], dtype=float) / n


# --------------------------------------------------------------------------- MGDA


def test_registry_holds_every_strategy():
    """The seven of this file at least (strategies with their own file test themselves)."""
    assert set(ALL) <= set(WEIGHTINGS.names())


@pytest.mark.parametrize("seed", range(5))
def test_min_norm_of_two_vectors_is_the_closed_form(seed):
    rng = np.random.default_rng(seed)
    v1, v2 = rng.normal(size=6), rng.normal(size=6)
    if seed == 0:
        v2 = v1 * 3.0  # the min-norm point is the shorter vertex
    gram = np.array([[v1 @ v1, v1 @ v2], [v1 @ v2, v2 @ v2]])
    w = min_norm_coefficients(gram)
    # Closed form: the foot of the perpendicular from 0 on the segment [v2, v1], clipped.
    gamma = np.clip((v2 - v1) @ v2 / ((v1 - v2) @ (v1 - v2)), 0.0, 1.0)
    np.testing.assert_allclose(w, [gamma, 1 - gamma], atol=1e-12)
    ts = np.linspace(0, 1, 20001)
    norms = np.linalg.norm(ts[:, None] * v1 + (1 - ts[:, None]) * v2, axis=1)
    assert np.linalg.norm(w[0] * v1 + w[1] * v2) <= norms.min() + 1e-9


def test_min_norm_of_orthogonal_unit_vectors_is_the_midpoint():
    np.testing.assert_allclose(min_norm_coefficients(np.eye(2)), [0.5, 0.5])


@pytest.mark.parametrize("seed", range(4))
def test_min_norm_of_three_vectors_matches_a_grid_search(seed):
    rng = np.random.default_rng(10 + seed)
    vs = rng.normal(size=(3, 5))
    gram = vs @ vs.T
    w = min_norm_coefficients(gram)
    assert w.min() >= 0 and w.sum() == pytest.approx(1.0)
    grid = _simplex_grid(3, 400)
    best = np.linalg.norm(grid @ vs, axis=1).min()
    found = np.linalg.norm(w @ vs)
    assert found <= best + 1e-9
    assert found >= best - 2e-2 * np.linalg.norm(vs, axis=1).max()


def test_mgda_normalisation_rescales_the_gradients():
    gram = np.array([[4.0, 0.0], [0.0, 1.0]])  # orthogonal, norms 2 and 1
    mgda = build_weighting("mgda", ["a", "b"])
    np.testing.assert_allclose(mgda.coefficients(gram, np.ones(2)), [0.2, 0.8])
    l2 = build_weighting("mgda", ["a", "b"], {"normalisation": "l2"})
    np.testing.assert_allclose(l2.coefficients(gram, np.ones(2)), [0.5, 0.5])
    loss = build_weighting("mgda", ["a", "b"], {"normalisation": "loss"})
    # gradients divided by losses 2 and 1 -> unit norms -> the midpoint
    np.testing.assert_allclose(loss.coefficients(gram, np.array([2.0, 1.0])), [0.5, 0.5])


# --------------------------------------------------------------------------- toy model


class Toy(nn.Module):
    """Losses L_k = g_k . theta (+ head_k^2): their shared gradients are exactly g_k.

    ``theta`` is 4-d, like a conv weight, so that GradNorm finds its layer."""

    def __init__(self, grads: np.ndarray) -> None:
        super().__init__()
        self.g = torch.tensor(grads, dtype=torch.float64)
        self.theta = nn.Parameter(torch.zeros(grads.shape[1], 1, 1, 1, dtype=torch.float64))
        self.heads = nn.Parameter(torch.ones(len(grads), dtype=torch.float64))

    def losses(self, names, present=None):
        present = [True] * len(names) if present is None else present
        out = {}
        for k, name in enumerate(names):
            value = self.g[k] @ self.theta.flatten() + self.heads[k] ** 2 + 1.0
            out[name] = value if present[k] else value * 0.0
        return out


def _step(strategy, toy, names, present=None, extra=None):
    flags = torch.tensor([True] * len(names) if present is None else present)
    extra = torch.zeros((), dtype=torch.float64) if extra is None else extra
    toy.zero_grad(set_to_none=True)
    return strategy.backward(toy.losses(names, flags.tolist()), extra,
                             GradientContext(flags, [toy.theta]))


def test_pcgrad_projects_two_conflicting_gradients():
    g = np.array([[1.0, 0.0], [-1.0, 1.0]])
    toy = Toy(g)
    _step(build_weighting("pcgrad", ["a", "b"]), toy, ["a", "b"])
    # g1 - (g1.g2/|g2|^2) g2 = [1,0] + 0.5[-1,1]; g2 - (g2.g1/|g1|^2) g1 = [-1,1] + [1,0]
    np.testing.assert_allclose(toy.theta.grad.numpy().ravel(), [0.5 + 0.0, 0.5 + 1.0])
    np.testing.assert_allclose(toy.heads.grad.numpy(), [2.0, 2.0])  # plain sum on heads


def test_pcgrad_leaves_agreeing_gradients_alone():
    g = np.array([[1.0, 0.5], [0.2, 1.0]])
    toy = Toy(g)
    _step(build_weighting("pcgrad", ["a", "b"]), toy, ["a", "b"])
    np.testing.assert_allclose(toy.theta.grad.numpy().ravel(), g.sum(0))


def _pcgrad_reference(vs: np.ndarray, orders) -> np.ndarray:
    out = []
    for i, v in enumerate(vs):
        p = v.copy()
        for j in orders[i]:
            if p @ vs[j] < 0:
                p = p - (p @ vs[j]) / (vs[j] @ vs[j]) * vs[j]
        out.append(p)
    return np.sum(out, axis=0)


@pytest.mark.parametrize("seed", range(3))
def test_pcgrad_coefficients_match_projection_in_vector_space(seed):
    rng = np.random.default_rng(seed)
    vs = rng.normal(size=(4, 6))
    orders = [rng.permutation(4).tolist() for _ in range(4)]
    coef = pcgrad_coefficients(vs @ vs.T, orders)
    np.testing.assert_allclose(coef @ vs, _pcgrad_reference(vs, orders), atol=1e-12)


def test_pcgrad_generator_state_is_saved_and_restored():
    a = build_weighting("pcgrad", list("abc"), {"seed": 3})
    gram = np.array([[1.0, -0.9, 0.2], [-0.9, 1.0, -0.7], [0.2, -0.7, 1.0]])
    a.coefficients(gram, np.ones(3))
    state = a.state_dict()
    b = build_weighting("pcgrad", list("abc"), {"seed": 99})
    b.load_state_dict(state)
    for _ in range(5):
        np.testing.assert_array_equal(
            a.coefficients(gram, np.ones(3)), b.coefficients(gram, np.ones(3))
        )


# --------------------------------------------------------------------------- CAGrad


def _cagrad_dual_value(w, gram, radius):
    k = len(gram)
    return w @ gram @ np.full(k, 1 / k) + radius * math.sqrt(max(w @ gram @ w, 0.0))


def test_cagrad_with_c_zero_is_the_mean_gradient():
    rng = np.random.default_rng(0)
    vs = rng.normal(size=(3, 4))
    np.testing.assert_allclose(cagrad_coefficients(vs @ vs.T, c=0.0), np.full(3, 1 / 3))
    toy = Toy(vs)
    _step(build_weighting("cagrad", list("abc"), {"c": 0.0}), toy, list("abc"))
    np.testing.assert_allclose(toy.theta.grad.numpy().ravel(), vs.mean(0), atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_cagrad_dual_matches_a_grid_search_for_two_tasks(seed):
    rng = np.random.default_rng(seed)
    vs = rng.normal(size=(2, 5))
    gram = vs @ vs.T
    c = 0.4
    radius = c * np.linalg.norm(vs.mean(0))
    w = cagrad_dual(gram, radius)
    ts = np.linspace(0, 1, 100001)
    values = [_cagrad_dual_value(np.array([t, 1 - t]), gram, radius) for t in ts]
    best = int(np.argmin(values))
    assert _cagrad_dual_value(w, gram, radius) <= values[best] + 1e-9
    assert w[0] == pytest.approx(ts[best], abs=1e-3)
    # The update from the grid's dual solution is the same vector.
    wg = np.array([ts[best], 1 - ts[best]])
    gw = wg @ vs
    expected = (vs.mean(0) + radius * gw / np.linalg.norm(gw)) / (1 + c * c)
    np.testing.assert_allclose(cagrad_coefficients(gram, c) @ vs, expected, atol=2e-3)


@pytest.mark.parametrize("seed", range(3))
def test_cagrad_update_maximises_the_worst_improvement_in_its_ball(seed):
    rng = np.random.default_rng(100 + seed)
    vs = rng.normal(size=(3, 4))
    c = 0.5
    g0 = vs.mean(0)
    d = cagrad_coefficients(vs @ vs.T, c, rescale=0) @ vs
    assert np.linalg.norm(d - g0) <= c * np.linalg.norm(g0) * (1 + 1e-6)
    directions = rng.normal(size=(20000, 4))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    radii = rng.random((20000, 1)) ** 0.25 * c * np.linalg.norm(g0)
    candidates = g0 + radii * directions
    assert (vs @ d).min() >= (candidates @ vs.T).min(1).max() - 1e-6


def test_simplex_projection():
    np.testing.assert_allclose(project_simplex(np.array([0.2, 0.3, 0.5])), [0.2, 0.3, 0.5])
    np.testing.assert_allclose(project_simplex(np.array([2.0, 0.0])), [1.0, 0.0])
    np.testing.assert_allclose(project_simplex(np.array([1.0, 1.0])), [0.5, 0.5])


# --------------------------------------------------------------------------- uncertainty


@pytest.mark.parametrize(
    ("regulariser", "optimum"), [("half", math.log(3.0)), ("full", math.log(1.5))]
)
def test_uncertainty_log_variance_converges_to_its_closed_form(regulariser, optimum):
    # d/ds [0.5 e^-s L + c s] = 0  ->  s = log(L / (2c)): log L (c = 1/2), log(L/2) (c = 1)
    strategy = build_weighting("uncertainty", ["a"], {"regulariser": regulariser})
    opt = torch.optim.Adam(strategy.parameters(), lr=0.05)
    loss = torch.tensor(3.0)
    for _ in range(1500):
        opt.zero_grad()
        strategy.backward({"a": loss}, torch.zeros(()), GradientContext(torch.tensor([True])))
        opt.step()
    assert strategy.log_vars[0].item() == pytest.approx(optimum, abs=1e-3)


def test_uncertainty_objective_value_and_gradients():
    strategy = build_weighting("uncertainty", ["a", "b"])
    with torch.no_grad():
        strategy.log_vars[0].fill_(0.5)
        strategy.log_vars[1].fill_(-1.0)
    la = torch.tensor(2.0, requires_grad=True)
    lb = torch.tensor(4.0, requires_grad=True)
    total = strategy.backward({"a": la, "b": lb}, torch.tensor(1.0),
                              GradientContext(torch.tensor([1, 1]) > 0))
    expected = 0.5 * math.exp(-0.5) * 2 + 0.25 + 0.5 * math.exp(1.0) * 4 - 0.5 + 1.0
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert la.grad.item() == pytest.approx(0.5 * math.exp(-0.5), rel=1e-6)
    assert strategy.log_vars[1].grad.item() == pytest.approx(
        -0.5 * math.exp(1.0) * 4 + 0.5, rel=1e-6
    )


# --------------------------------------------------------------------------- GradNorm


class LinearTwoTask(nn.Module):
    """A 1x1 conv as the shared layer, one linear head per task."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.shared = nn.Parameter(torch.randn(3, 2, 1, 1, generator=gen, dtype=torch.float64))
        self.heads = nn.Parameter(torch.randn(2, 3, generator=gen, dtype=torch.float64))
        self.x = torch.randn(5, 2, generator=gen, dtype=torch.float64)
        self.y = torch.randn(2, 5, generator=gen, dtype=torch.float64)

    def losses(self, scale=(1.0, 1.0)):
        h = self.x @ self.shared[:, :, 0, 0].T
        return {
            t: scale[k] * ((h @ self.heads[k] - self.y[k]) ** 2).mean()
            for k, t in enumerate(["a", "b"])
        }


def _gradnorm_reference(model, weights, initial, alpha):
    """Chen et al.'s GradNorm step written out with create_graph, as the paper states it."""
    losses = model.losses()
    w = torch.tensor(weights, dtype=torch.float64, requires_grad=True)
    norms = torch.stack(
        [
            torch.autograd.grad(w[k] * losses[t], model.shared, create_graph=True)[0].norm()
            for k, t in enumerate(["a", "b"])
        ]
    )
    ratio = torch.stack([losses[t].detach() / initial[k] for k, t in enumerate(["a", "b"])])
    ratio = ratio / ratio.mean()
    target = (norms.mean() * ratio**alpha).detach()
    w_grad = torch.autograd.grad((norms - target).abs().sum(), w)[0]
    model_grads = torch.autograd.grad(
        w.detach() @ torch.stack(list(losses.values())), [model.shared, model.heads]
    )
    return w_grad, model_grads


def test_gradnorm_step_matches_a_hand_written_implementation():
    model = LinearTwoTask()
    strategy = build_weighting("gradnorm", ["a", "b"], {"alpha": 0.5}).double()
    present = torch.tensor([True, True])
    shared = [model.shared]
    with torch.no_grad():
        strategy.weights[0].fill_(1.5)
        strategy.weights[1].fill_(0.5)
    # First step: records the initial losses (ratios are 1).
    strategy.backward(model.losses(), torch.zeros(()), GradientContext(present, shared))
    initial = [v.item() for v in model.losses().values()]
    np.testing.assert_allclose(strategy.initial_losses.numpy(), initial)
    # Second step after a change to the model: compare with the reference.
    with torch.no_grad():
        model.heads.mul_(0.7)
    model.zero_grad()
    for p in strategy.weights:
        p.grad = None
    strategy.backward(model.losses(), torch.zeros(()), GradientContext(present, shared))
    w_grad, (g_shared, g_heads) = _gradnorm_reference(model, [1.5, 0.5], initial, 0.5)
    np.testing.assert_allclose(
        [p.grad.item() for p in strategy.weights], w_grad.numpy(), rtol=1e-10
    )
    np.testing.assert_allclose(model.shared.grad.numpy(), g_shared.numpy(), rtol=1e-10)
    np.testing.assert_allclose(model.heads.grad.numpy(), g_heads.numpy(), rtol=1e-10)
    # The weights' own optimiser steps; the next call renormalises to sum T = 2.
    (group,) = strategy.optimizer_groups()
    assert group.lr == 0.025 and group.params == list(strategy.weights)
    with torch.no_grad():  # as if the optimiser had moved them off the constraint
        strategy.weights[0].fill_(3.0)
        strategy.weights[1].fill_(1.0)
    np.testing.assert_allclose(strategy.current_weights().numpy(), [1.5, 0.5])
    strategy.backward(model.losses(), torch.zeros(()), GradientContext(present, shared))
    np.testing.assert_allclose([p.item() for p in strategy.weights], [1.5, 0.5])


def test_gradnorm_first_observed_loss_waits_for_the_task():
    model = LinearTwoTask()
    strategy = build_weighting("gradnorm", ["a", "b"]).double()
    losses = model.losses()
    losses["b"] = losses["b"] * 0.0
    strategy.backward(losses, torch.zeros(()),
                      GradientContext(torch.tensor([True, False]), [model.shared]))
    assert strategy.observed.tolist() == [True, False]
    assert strategy.weights[1].grad is None and strategy.weights[0].grad is not None
    model.zero_grad()
    strategy.backward(model.losses(), torch.zeros(()),
                      GradientContext(torch.tensor([True, True]), [model.shared]))
    assert strategy.observed.tolist() == [True, True]
    assert strategy.initial_losses[1].item() == pytest.approx(model.losses()["b"].item())


# --------------------------------------------------------------------------- DWA


def test_dwa_weights_follow_the_formula():
    strategy = build_weighting("dwa", ["a", "b", "c"], {"temperature": 2.0})
    means = [
        {"a": 1.0, "b": 2.0, "c": 4.0},
        {"a": 0.5, "b": 3.0, "c": 4.0},
        {"a": 0.25, "b": 3.0, "c": 2.0},
    ]
    strategy.end_epoch(means[0])
    np.testing.assert_allclose(strategy.lambdas.numpy(), [1, 1, 1])
    strategy.end_epoch(means[1])
    r = np.array([0.5, 1.5, 1.0])
    np.testing.assert_allclose(
        strategy.lambdas.numpy(), 3 * np.exp(r / 2) / np.exp(r / 2).sum(), rtol=1e-6
    )
    strategy.end_epoch(means[2])
    r = np.array([0.5, 1.0, 0.5])
    expected = 3 * np.exp(r / 2) / np.exp(r / 2).sum()
    np.testing.assert_allclose(strategy.lambdas.numpy(), expected, rtol=1e-6)
    losses = {"a": torch.tensor(1.0), "b": torch.tensor(2.0), "c": torch.tensor(3.0)}
    total = strategy.backward(losses, torch.zeros(()),
                              GradientContext(torch.ones(3, dtype=torch.bool)))
    assert total.item() == pytest.approx(expected @ [1, 2, 3], rel=1e-6)
    # b absent from the batch: the softmax runs over a and c, scaled by 2
    w = strategy.step_weights(torch.tensor([True, False, True])).numpy()
    r = np.array([0.5, 0.5])
    np.testing.assert_allclose(w[[0, 2]], 2 * np.exp(r / 2) / np.exp(r / 2).sum(), rtol=1e-6)


def test_dwa_gives_an_unusable_ratio_weight_one_outside_the_softmax():
    w = dwa_weights(torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0.0, 2.0, 1.0]), 2.0)
    np.testing.assert_allclose(
        w.numpy(), [1.0, *(2 * np.exp([1.0, 0.5]) / np.exp([1.0, 0.5]).sum())], rtol=1e-6
    )
    strategy = build_weighting("dwa", ["a", "b"])
    strategy.end_epoch({"a": 1.0})
    strategy.end_epoch({"a": 2.0})
    assert torch.isfinite(strategy.lambdas).all()


# --------------------------------------------------------------------------- partial labels


@pytest.mark.parametrize("name", ALL)
def test_an_absent_task_leaves_state_alone_and_makes_no_nan(name):
    rng = np.random.default_rng(0)
    vs = rng.normal(size=(3, 4))
    names = ["a", "b", "c"]
    strategy = build_weighting(name, names).double()
    toy = Toy(vs)
    toy.theta.data = torch.tensor(rng.normal(size=(4, 1, 1, 1)))
    before = {
        k: v.clone()
        for k, v in strategy.state_dict().items()
        if isinstance(v, torch.Tensor) and k != "_extra_state"
    }
    total = _step(strategy, toy, names, present=[True, False, True])
    assert torch.isfinite(total)
    assert torch.isfinite(toy.theta.grad).all() and torch.isfinite(toy.heads.grad).all()
    assert toy.heads.grad[1].item() == 0.0
    for key, value in strategy.state_dict().items():
        if key in before:
            if not key.endswith(("initial_losses", "observed")):
                torch.testing.assert_close(value, before[key], rtol=0, atol=0, equal_nan=True)
    for i, p in enumerate(strategy.parameters()):
        assert (p.grad is None) == (i == 1), i  # the absent task's parameter gets no gradient
    if name == "gradnorm":
        assert strategy.observed.tolist() == [True, False, True]
        assert strategy.initial_losses[1].item() == 0.0
    if name == "dwa":
        strategy.end_epoch({"a": 1.0, "b": 0.0, "c": 2.0})
        strategy.end_epoch({"a": 1.0, "b": 0.0, "c": 2.0})
        assert torch.isfinite(strategy.lambdas).all()
    # All tasks absent: nothing but the extra term.
    toy.zero_grad()
    extra = toy.theta.sum()
    assert torch.isfinite(_step(strategy, toy, names, [False] * 3, extra))
    np.testing.assert_allclose(toy.theta.grad.numpy().ravel(), np.ones(4))


@pytest.mark.parametrize("name", ["uniform", "uncertainty", "mgda", "cagrad"])
def test_an_absent_task_is_as_if_it_did_not_exist(name):
    rng = np.random.default_rng(1)
    vs = rng.normal(size=(3, 4))
    three = build_weighting(name, ["a", "b", "c"]).double()
    two = build_weighting(name, ["a", "c"]).double()
    toy3, toy2 = Toy(vs), Toy(vs[[0, 2]])
    toy3.theta.data = toy2.theta.data = torch.tensor(rng.normal(size=(4, 1, 1, 1)))
    t3 = _step(three, toy3, ["a", "b", "c"], present=[True, False, True])
    t2 = _step(two, toy2, ["a", "c"])
    assert t3.item() == pytest.approx(t2.item())
    np.testing.assert_allclose(toy3.theta.grad.numpy(), toy2.theta.grad.numpy(), atol=1e-12)
    np.testing.assert_allclose(toy3.heads.grad.numpy()[[0, 2]], toy2.heads.grad.numpy())


@pytest.mark.parametrize("name", ["gradnorm", "mgda", "pcgrad", "cagrad"])
def test_gradient_strategies_fall_back_to_the_plain_sum_without_shared_parameters(name):
    toy = Toy(np.array([[1.0, 0.0], [-1.0, 1.0]]))
    strategy = build_weighting(name, ["a", "b"]).double()
    toy.zero_grad()
    total = strategy.backward(
        toy.losses(["a", "b"]), torch.zeros(()), GradientContext(torch.tensor([True, True]))
    )
    np.testing.assert_allclose(toy.theta.grad.numpy().ravel(), [0.0, 1.0])
    assert total.item() == pytest.approx(4.0)


def test_mgda_weights_heads_and_extra_gets_a_plain_backward():
    vs = np.array([[2.0, 0.0], [0.0, 1.0]])
    toy = Toy(vs)
    extra = (toy.theta.flatten() * torch.tensor([3.0, 5.0], dtype=torch.float64)).sum()
    _step(build_weighting("mgda", ["a", "b"]), toy, ["a", "b"], extra=extra)
    np.testing.assert_allclose(toy.theta.grad.numpy().ravel(), [0.2 * 2 + 3, 0.8 * 1 + 5])
    np.testing.assert_allclose(toy.heads.grad.numpy(), [0.2 * 2, 0.8 * 2])


# --------------------------------------------------------------------------- config, CLI


ARGS = [
    *TINY,
    "train.eval_every=2",
    "train.checkpoint_every=2",
    "optim.lr=1e-3",
    "train.max_steps_per_epoch=2",
    "train.eval_batch_size=4",
]


@pytest.mark.parametrize("name", ALL)
def test_train_from_the_cli_with_each_strategy(tiny_root, tmp_path, name):
    epochs = ["train.epochs=2", "train.max_steps_per_epoch=1"] if name == "dwa" else []
    run = train_cli(
        tmp_path / "run",
        tiny_root,
        *ARGS,
        "method.name=sl",
        f"method.weighting={name}",
        "labels.regime=random",
        *epochs,
    )
    final = final_metrics(run)
    assert all(np.isfinite(v) for v in final["metrics"].values())
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["weighting"]
    if name == "gradnorm":
        weights = torch.stack([state[f"weights.{i}"] for i in range(3)])
        assert not torch.equal(weights, torch.ones(3))  # learned by its own optimiser
        assert state["observed"].all()
    if name == "dwa":
        assert state["epochs_seen"].item() == 2
    if name == "uncertainty":
        assert any(state[f"log_vars.{i}"].item() != 0.0 for i in range(3))


def test_train_xtc_with_uncertainty_from_the_cli(tiny_root, tmp_path):
    run = train_cli(
        tmp_path / "run",
        tiny_root,
        *ARGS,
        "method.name=xtc",
        "method.weighting=uncertainty",
        "method.weighting_options={regulariser: full}",
        "labels.regime=onelabel",
        "train.max_steps_per_epoch=1",
    )
    final = final_metrics(run)
    assert all(np.isfinite(v) for v in final["metrics"].values())


@pytest.mark.parametrize("name", ["gradnorm", "pcgrad", "famo", "db_mtl", "gradvac", "excess_mtl",
                                  "graddrop", "moco"])
def test_resume_with_a_stateful_strategy_is_exact(tiny_root, tmp_path, name):
    args = [
        "method.name=sl",
        f"method.weighting={name}",
        "labels.regime=random",
        "train.eval_every=1",
        "train.checkpoint_every=1",
        "train.max_steps_per_epoch=1",
    ]
    train_cli(tmp_path / "full", tiny_root, *ARGS, *args, "train.epochs=2")
    train_cli(tmp_path / "part", tiny_root, *ARGS, *args, "train.epochs=1")
    assert main(["train", "--resume", str(tmp_path / "part"), "train.epochs=2"]) == 0
    full = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    part = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    for key in ("model", "weighting"):
        for k, value in full[key].items():  # FAMO's extra state: its optimiser's state dict
            torch.testing.assert_close(value, part[key][k], rtol=0, atol=0, msg=f"{key}.{k}")
    if name == "famo":  # the logits moved (after_step ran in the loop), once per step
        assert any(full["weighting"][f"logits.{i}"] != 0 for i in range(3))
        assert full["weighting"]["_extra_state"]["state"][0]["step"] == 2


def test_unknown_weighting_and_option_are_config_errors(tiny_root, tmp_path, capsys):
    base = ["train", "--run-dir", str(tmp_path / "r"), f"dataset.root={tiny_root}", *ARGS]
    assert main([*base, "method.weighting=fancy"]) == 2
    err = capsys.readouterr().err
    assert "method.weighting" in err and "fancy" in err
    assert all(name in err for name in ALL)
    assert main([*base, "method.weighting=gradnorm", "method.weighting_options={beta: 1}"]) == 2
    err = capsys.readouterr().err
    assert "method.weighting_options.beta" in err and "alpha, lr" in err
    assert (
        main([*base, "method.weighting=mgda", "method.weighting_options={normalisation: l3}"]) == 2
    )
    assert "'none', 'l2', 'loss' or 'loss+'" in capsys.readouterr().err


def test_compare_variants_set_the_weighting():
    config = load_config("synthetic_table5")
    cell = cell_config_for(config, "full", "xtc_uncertainty", seed=0)
    assert (cell.method.name, cell.method.weighting) == ("xtc", "uncertainty")
    assert cell.method.options["con_weight"] == 2.0
    cell = cell_config_for(config, "full", "gradnorm", seed=0)
    assert (cell.method.name, cell.method.weighting) == ("sl", "gradnorm")
    assert cell.method.weighting_options == {"alpha": 0.16}
    base = load_config(
        "synthetic_table5", ["method.weighting=dwa", "method.weighting_options={temperature: 3}"]
    )
    kept = cell_config_for(base, "full", "xtc", seed=0)
    assert kept.method.weighting == "dwa" and kept.method.weighting_options == {"temperature": 3}
    assert cell_config_for(base, "full", "mgda", 0).method.weighting_options == {}
    assert set(config.compare.methods) >= {
        "mtl",
        "uncertainty",
        "gradnorm",
        "dwa",
        "mgda",
        "pcgrad",
        "cagrad",
        "xtc",
        "xtc_uncertainty",
    }


def test_compare_runs_a_weighting_variant_from_the_cli(tiny_root, tmp_path, capsys):
    out = tmp_path / "grid"
    args = [
        "compare",
        "--config",
        "synthetic_table5",
        "--out",
        str(out),
        "--methods",
        "mtl,uncertainty",
        "--regimes",
        "full",
        "--seeds",
        "0",
        f"dataset.root={tiny_root}",
        *ARGS,
        "train.max_steps_per_epoch=1",
        "compare.baseline=mtl",
    ]
    assert main(args) == 0
    saved = load_config(str(out / "full" / "uncertainty" / "seed0" / "config.yaml"))
    assert (saved.method.name, saved.method.weighting) == ("sl", "uncertainty")
    state = load_checkpoint(out / "full" / "uncertainty" / "seed0" / "checkpoint.pt")
    assert "log_vars.0" in state["weighting"]
    assert "uncertainty" in (out / "results.md").read_text()
