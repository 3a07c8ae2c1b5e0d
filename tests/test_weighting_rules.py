"""The strategies added with torchjd's and LibMTL's union (graddrop, config, fairgrad,
nash_mtl, gradvac, constant, db_mtl, stch, cr_mogm, modo): each one's defining property against
an independent computation (torchjd's object on the same draws, a closed form, a hand-computed
step). That an absent task changes nothing is checked for every strategy in
test_registries.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtpsl.core.errors import ConfigError
from mtpsl.weighting import GradientContext, build_weighting
from mtpsl.weighting.nash_mtl import nash_weights

from conftest import load_benchmark

tja = pytest.importorskip("torchjd.aggregation")
NAMES = ("a", "b", "c")


def _jacobian(seed: int, k: int = 3, p: int = 7) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((k, p)))


def _applied(name: str, losses: list[torch.Tensor], theta: torch.nn.Parameter,
             strategy=None, present=None, **options) -> torch.Tensor:
    """The shared gradient the strategy applies for these losses (of ``theta``)."""
    strategy = strategy or build_weighting(name, NAMES[:len(losses)], options).double()
    present = torch.ones(len(losses), dtype=torch.bool) if present is None else present
    theta.grad = None
    strategy.backward(dict(zip(NAMES, losses, strict=False)), torch.zeros((), dtype=torch.float64),
                      GradientContext(present, [theta]))
    return theta.grad.clone()


def _linear_losses(jac: torch.Tensor, offset: float = 2.0):
    """Losses ``L_k = g_k . theta + offset`` at theta = 0: their gradients are the rows."""
    theta = torch.nn.Parameter(torch.zeros(jac.shape[1], dtype=torch.float64))
    return theta, [jac[k] @ theta + offset for k in range(len(jac))]


# --- graddrop ---------------------------------------------------------------------------------


@pytest.mark.parametrize("leak", [0.0, 0.3])
def test_graddrop_is_torchjds_on_the_same_draws(leak):
    jac = _jacobian(0, p=200)
    strategy = build_weighting("graddrop", NAMES, {"leak": leak, "seed": 5})
    ours = strategy.aggregate(jac, torch.ones(3), [0, 1, 2])
    torch.manual_seed(5)
    theirs = tja.GradDrop(leak=torch.full((3,), leak, dtype=jac.dtype))(jac)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    # a coordinate where every task agrees on the sign is kept whole
    agree = (jac > 0).all(0) | (jac < 0).all(0)
    torch.testing.assert_close(ours[agree], jac.sum(0)[agree])


def test_graddrop_draws_resume_from_its_saved_state():
    jac = _jacobian(1, p=50)
    a = build_weighting("graddrop", NAMES)
    a.aggregate(jac, torch.ones(3), [0, 1, 2])
    b = build_weighting("graddrop", NAMES)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a.aggregate(jac, torch.ones(3), [0, 1, 2]),
                               b.aggregate(jac, torch.ones(3), [0, 1, 2]))


# --- config -----------------------------------------------------------------------------------


def test_config_of_two_orthogonal_gradients_is_their_sum():
    jac = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    theta, losses = _linear_losses(jac)
    # unit direction (1, 1)/sqrt2; length = sum of projections = (2 + 1)/sqrt2
    expected = torch.tensor([1.5, 1.5], dtype=torch.float64)
    torch.testing.assert_close(_applied("config", losses, theta), expected)


@pytest.mark.parametrize("seed", [0, 1])
def test_config_makes_the_same_angle_with_every_task(seed):
    jac = _jacobian(seed)
    theta, losses = _linear_losses(jac)
    d = _applied("config", losses, theta)
    cosines = (jac @ d) / (jac.norm(dim=1) * d.norm())
    torch.testing.assert_close(cosines, cosines[:1].expand(3), rtol=1e-8, atol=1e-10)
    # its length is the sum of the task gradients' projections on it
    assert float(d.norm()) == pytest.approx(float((jac @ d).sum() / d.norm()))


# --- fairgrad and nash_mtl --------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_fairgrad_weights_solve_their_equation(alpha):
    jac = _jacobian(2).numpy()
    gram = jac @ jac.T
    w = build_weighting("fairgrad", NAMES, {"alpha": alpha}).coefficients(gram, np.ones(3))
    np.testing.assert_allclose(gram @ w, w ** (-1.0 / alpha), rtol=1e-5)


def test_fairgrad_with_alpha_zero_is_the_mean():
    gram = (_jacobian(3) @ _jacobian(3).T).numpy()
    w = build_weighting("fairgrad", NAMES, {"alpha": 0.0}).coefficients(gram, np.ones(3))
    np.testing.assert_allclose(w, np.full(3, 1 / 3))


def test_nash_weights_of_orthogonal_gradients_are_the_inverse_norms():
    gram = np.diag([4.0, 1.0, 0.25])
    np.testing.assert_allclose(nash_weights(gram), [0.5, 1.0, 2.0], rtol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_nash_weights_are_the_bargaining_solution(seed):
    jac = _jacobian(seed, k=4, p=9).numpy()
    gram = jac @ jac.T
    alpha = nash_weights(gram)
    assert (alpha > 0).all()
    np.testing.assert_allclose(alpha * (gram @ alpha), np.ones(4), rtol=1e-8)
    # the same fixed point by an independent solver: torchjd's FairGrad at alpha = 1
    fair = tja.FairGradWeighting(alpha=1.0)(torch.from_numpy(gram)).numpy()
    np.testing.assert_allclose(alpha, fair, rtol=1e-4)


def test_nash_weights_leave_a_zero_gradient_out():
    gram = np.diag([4.0, 0.0, 1.0])
    np.testing.assert_allclose(nash_weights(gram), [0.5, 0.0, 1.0], rtol=1e-9)


def test_nash_mtl_clips_the_shared_update_and_weights_the_heads_unclipped():
    jac = torch.tensor([[0.3, 0.0], [0.0, 0.1]], dtype=torch.float64)  # alpha = (10/3, 10)
    theta = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    heads = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    losses = [jac[k] @ theta + heads[k] * (k + 1.0) + 1.0 for k in range(2)]
    applied = _applied("nash_mtl", losses, theta, max_norm=0.5)
    # d = alpha @ jac = (1, 1): norm sqrt2 > 0.5, so it is scaled to 0.5
    torch.testing.assert_close(applied, torch.full((2,), 0.5 / 2 ** 0.5, dtype=torch.float64))
    torch.testing.assert_close(heads.grad, torch.tensor([10 / 3, 20.0], dtype=torch.float64))
    unclipped = _applied("nash_mtl", [jac[k] @ theta + 1.0 for k in range(2)], theta,
                         max_norm=0.0)
    torch.testing.assert_close(unclipped, torch.ones(2, dtype=torch.float64))


# --- gradvac ----------------------------------------------------------------------------------


def test_gradvac_is_torchjds_over_several_steps_with_its_targets():
    strategy = build_weighting("gradvac", NAMES, {"seed": 11})
    theirs = tja.GradVacWeighting(beta=0.5, eps=1e-8)
    torch.manual_seed(11)
    for step in range(4):
        gram = (_jacobian(step) @ _jacobian(step).T)
        ours = strategy.coefficients(gram.numpy(), np.ones(3))
        np.testing.assert_allclose(ours, theirs(gram).numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(strategy.targets.numpy(), theirs._phi_t.numpy(), atol=1e-12)
    assert (strategy.targets.numpy()[~np.eye(3, dtype=bool)] != 0).all()


def test_gradvac_raises_a_pair_to_its_target_cosine():
    """By hand: g1 = (1, 0), g2 = (-1, 1) (cosine -1/sqrt2), targets 0 (kept by beta = 0):
    g1 gains w g2 with w = |g1| (0 - phi) / |g2| = 0.5, so g1' = (0.5, 0.5), orthogonal to
    g2; g2 gains w2 g1 likewise; the update is g1' + g2'."""
    strategy = build_weighting("gradvac", NAMES[:2], {"beta": 0.0})
    gram = np.array([[1.0, -1.0], [-1.0, 2.0]])
    coef = strategy.coefficients(gram, np.ones(2))
    g = np.array([[1.0, 0.0], [-1.0, 1.0]])
    first = np.array([1.0, 0.5]) @ g
    np.testing.assert_allclose(first, [0.5, 0.5], atol=1e-7)
    phi2 = (g[1] @ g[0]) / (np.linalg.norm(g[1]) * np.linalg.norm(g[0]))
    w2 = np.linalg.norm(g[1]) * (0 - phi2) / np.linalg.norm(g[0])
    np.testing.assert_allclose(coef, [1.0 + w2, 1.5], atol=1e-7)


# --- constant ---------------------------------------------------------------------------------


def test_constant_weights_the_losses_and_names_unknown_tasks():
    strategy = build_weighting("constant", NAMES, {"weights": {"a": 2.0, "c": 0.5}})
    losses = {"a": torch.tensor(1.0), "b": torch.tensor(3.0), "c": torch.tensor(4.0)}
    total = strategy.backward(losses, torch.zeros(()),
                              GradientContext(torch.ones(3, dtype=torch.bool)))
    assert total.item() == pytest.approx(2.0 + 3.0 + 2.0)
    with pytest.raises(ConfigError, match=r"weights: unknown task\(s\) \['depht'\]"):
        build_weighting("constant", NAMES, {"weights": {"depht": 1.0}})


# --- db_mtl -----------------------------------------------------------------------------------


def test_db_mtl_follows_its_formula_for_two_steps():
    jac = _jacobian(4, k=2, p=5)
    offsets = torch.tensor([2.0, 5.0], dtype=torch.float64)
    beta = 0.8
    strategy = build_weighting("db_mtl", NAMES[:2], {"beta": beta, "sigma": 0.5}).double()
    theta = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    heads = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    averages = np.zeros((2, 5))
    for t in (1, 2):
        losses = [jac[k] @ theta + heads[k] ** 2 + offsets[k] for k in range(2)]
        values = np.array([float(v) for v in losses])
        heads.grad = None
        applied = _applied("db_mtl", losses, theta, strategy=strategy).numpy()
        log_grads = jac.numpy() / (values[:, None] + 1e-8)
        keep = beta / t ** 0.5
        averages = log_grads + keep * (averages - log_grads)
        norms = np.linalg.norm(averages, axis=1)
        np.testing.assert_allclose(applied, (norms.max() / (norms + 1e-8)) @ averages,
                                   rtol=1e-10)
        np.testing.assert_allclose(heads.grad.numpy(), 2 * heads.detach().numpy() / values)
        with torch.no_grad():
            theta -= 0.1 * theta.grad


# --- stch -------------------------------------------------------------------------------------


def test_stch_sums_log_losses_in_warm_up_then_smooths_the_max_of_log_ratios():
    strategy = build_weighting("stch", NAMES[:2], {"mu": 0.5, "warmup_epochs": 2}).double()
    x = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    on = torch.ones(2, dtype=torch.bool)
    zero = torch.zeros((), dtype=torch.float64)

    def run(scale: float) -> float:
        x.grad = None
        losses = {"a": scale * x[0] ** 2, "b": scale * x[1] ** 2}
        return float(strategy.backward(losses, zero, GradientContext(on)))

    assert run(1.0) == pytest.approx(np.log(1.0) + np.log(4.0))
    strategy.end_epoch({})
    run(1.0), run(3.0)  # the last warm-up epoch: nadir = the mean losses (2, 8)
    strategy.end_epoch({})
    np.testing.assert_allclose(strategy.nadir.numpy(), [2.0, 8.0])
    total = run(1.0)
    ratios = np.log([1.0, 4.0]) - np.log([2.0, 8.0])
    lse = np.log(np.exp(ratios / 0.5).sum())
    assert total == pytest.approx(2 * 0.5 * lse)
    soft = np.exp(ratios / 0.5) / np.exp(ratios / 0.5).sum()
    np.testing.assert_allclose(x.grad.numpy(), 2 * soft * 2 / np.array([1.0, 2.0]), rtol=1e-10)


# --- cr_mogm and modo -------------------------------------------------------------------------


def test_cr_mogm_is_torchjds_moving_average_of_the_base_weights():
    strategy = build_weighting("cr_mogm", NAMES, {"base": "imtl_g", "alpha": 0.7})
    theirs = tja.CRMOGMWeighting(tja.IMTLGWeighting(), alpha=0.7)
    for step in range(3):
        gram = _jacobian(step) @ _jacobian(step).T
        np.testing.assert_allclose(strategy.coefficients(gram.numpy(), np.ones(3)),
                                   theirs(gram).numpy(), rtol=1e-10)


def test_cr_mogm_refuses_a_base_without_coefficients():
    with pytest.raises(ConfigError, match="base: 'graddrop' gives no per-task coefficients"):
        build_weighting("cr_mogm", NAMES, {"base": "graddrop"})


def test_modo_is_torchjds_projected_step_over_several_steps():
    strategy = build_weighting("modo", NAMES, {"gamma": 0.2, "rho": 0.05})
    theirs = tja.MoDoWeighting(gamma=0.2, rho=0.05)
    for step in range(4):
        jac = _jacobian(step)
        np.testing.assert_allclose(strategy.coefficients((jac @ jac.T).numpy(), np.ones(3)),
                                   theirs(jac @ jac.T).numpy(), rtol=1e-10, atol=1e-12)


def test_sdmgrad_is_torchjds_over_several_steps():
    strategy = build_weighting("sdmgrad", NAMES, {"lr": 5.0, "pull": 0.4})
    theirs = tja.SDMGradWeighting(lr=5.0, momentum=0.5, n_iter=20, lambda_=0.4)
    for step in range(4):
        jac = _jacobian(step)
        np.testing.assert_allclose(strategy.coefficients((jac @ jac.T).numpy(), np.ones(3)),
                                   theirs(jac @ jac.T).numpy(), rtol=1e-9, atol=1e-12)


# --- excess_mtl -------------------------------------------------------------------------------


@pytest.mark.parametrize("warmup", [0, 2])
def test_excess_mtl_is_torchjds_over_several_steps(warmup):
    strategy = build_weighting("excess_mtl", NAMES,
                               {"step_size": 0.5, "warmup_steps": warmup}).double()
    theirs = tja.ExcessMTLWeighting(robust_step_size=0.5, n_warmup_steps=warmup)
    for step in range(5):
        jac = _jacobian(step)
        theta, losses = _linear_losses(jac)
        applied = _applied("excess_mtl", losses, theta, strategy=strategy)
        torch.testing.assert_close(applied, theirs(jac) @ jac, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(strategy.weights, torch.full((3,), 1 / 3, dtype=torch.float64))


def test_excess_mtl_state_survives_a_checkpoint():
    a = build_weighting("excess_mtl", NAMES).double()
    jac = _jacobian(0)
    theta, losses = _linear_losses(jac)
    _applied("excess_mtl", losses, theta, strategy=a)
    b = build_weighting("excess_mtl", NAMES).double()
    b.load_state_dict(a.state_dict())
    theta, losses = _linear_losses(_jacobian(1))
    first = _applied("excess_mtl", losses, theta, strategy=a)
    theta, losses = _linear_losses(_jacobian(1))
    torch.testing.assert_close(_applied("excess_mtl", losses, theta, strategy=b), first)


def test_the_weighting_benchmark_measures_against_uniform():
    """benchmarks/bench_weightings.py's measurement (one step, tiny) and its table."""
    from types import SimpleNamespace

    bench = load_benchmark("bench_weightings")
    args = SimpleNamespace(device="cpu", height=32, width=48, batch_size=2, width_mult=0.0625,
                           steps=1, warmup=0, amp="off")
    names = ("uniform", "nash_mtl", "mgda@representation", "mgda@gramian")
    rows = [{"weighting": n, **bench.measure_one(n, args)} for n in names]
    for row in rows:
        row["time_vs_uniform"] = row["s_per_step"] / rows[0]["s_per_step"]
        row["memory_vs_uniform"] = row["peak_gib"] / rows[0]["peak_gib"]
    assert rows[0]["linear_in_losses"] and not rows[1]["linear_in_losses"]
    assert "| nash_mtl |" in bench.table(rows) and rows[1]["shared_parameters"] > 0
    assert [r["gradients"] for r in rows[2:]] == ["representation", "gramian"]


# --- famo -------------------------------------------------------------------------------------


def test_famo_weights_log_losses_and_learns_from_the_decrease():
    """One step by hand: z = softmax(w) = (1/2, 1/2); the losses get the gradient of
    sum_k z_k log L_k / c, c = sum_k z_k / L_k; after the step, w takes Adam's first step along
    (diag(z) - z z') (log L_before - log L_after)."""
    strategy = build_weighting("famo", NAMES[:2], {"lr": 0.1, "weight_decay": 0.0})
    x = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    losses = {"a": x[0] ** 2, "b": x[1] ** 2}
    on = torch.ones(2, dtype=torch.bool)
    strategy.backward(losses, torch.zeros(()), GradientContext(on))
    before = np.array([1.0, 4.0])
    c = (0.5 / before).sum()
    np.testing.assert_allclose(x.grad.numpy(), 0.5 / (c * before) * 2 * x.detach().numpy(),
                               rtol=1e-6)
    after = np.array([0.25, 3.5])
    strategy.after_step({"a": torch.tensor(after[0]), "b": torch.tensor(after[1])}, on)
    z = np.array([0.5, 0.5])
    d = (np.diag(z) - np.outer(z, z)) @ (np.log(before + 1e-8) - np.log(after + 1e-8))
    logits = torch.zeros(2, requires_grad=True)
    reference = torch.optim.Adam([logits], lr=0.1)
    logits.grad = torch.tensor(d, dtype=torch.float32)
    reference.step()
    got = torch.stack([p.detach() for p in strategy.logits])
    torch.testing.assert_close(got, logits.detach())
    assert got[1] > got[0]  # b's loss fell less: it weighs more next time


def test_famo_logits_are_its_own_and_survive_a_checkpoint():
    a = build_weighting("famo", NAMES)
    assert a.trained_parameters() == []
    on = torch.ones(3, dtype=torch.bool)
    for _ in range(2):
        a.backward({t: torch.tensor(2.0) for t in NAMES}, torch.zeros(()), GradientContext(on))
        a.after_step({t: torch.tensor(v) for t, v in zip(NAMES, [1.0, 1.5, 1.9], strict=True)}, on)
    b = build_weighting("famo", NAMES)
    b.load_state_dict(a.state_dict())
    for s in (a, b):
        s.backward({t: torch.tensor(2.0) for t in NAMES}, torch.zeros(()), GradientContext(on))
        s.after_step({t: torch.tensor(v) for t, v in zip(NAMES, [1.0, 1.2, 1.9], strict=True)}, on)
    torch.testing.assert_close(torch.stack(list(a.logits)), torch.stack(list(b.logits)))


# --- moco -------------------------------------------------------------------------------------


def test_moco_tracks_the_rescaled_gradients_and_steps_its_weights():
    """Two steps by hand in numpy: y <- y - beta_t (y - L g / |g|), lambda <- softmax(lambda -
    gamma_t (Y Y' + rho I) lambda), update Y' lambda."""
    options = {"beta": 0.6, "beta_sigma": 0.5, "gamma": 0.2, "gamma_sigma": 0.5, "rho": 0.1}
    strategy = build_weighting("moco", NAMES, options).double()
    y, lam = np.zeros((3, 7)), np.full(3, 1 / 3)
    for t in (1, 2):
        jac = _jacobian(t)
        theta, losses = _linear_losses(jac, offset=1.0 + t)
        applied = _applied("moco", losses, theta, strategy=strategy).numpy()
        g = jac.numpy()
        scaled = g / (np.linalg.norm(g, axis=1, keepdims=True) + 1e-8) * (1.0 + t)
        y = y - 0.6 / t ** 0.5 * (y - scaled)
        logits = lam - 0.2 / t ** 0.5 * ((y @ y.T + 0.1 * np.eye(3)) @ lam)
        lam = np.exp(logits) / np.exp(logits).sum()
        np.testing.assert_allclose(applied, lam @ y, rtol=1e-9, atol=1e-12)


# --- our own MGDA and PCGrad against torchjd's ------------------------------------------------


def test_pcgrad_is_torchjds_on_the_same_orders():
    gram = (_jacobian(5) @ _jacobian(5).T)
    strategy = build_weighting("pcgrad", NAMES, {"seed": 3})
    torch.manual_seed(3)
    np.testing.assert_allclose(strategy.coefficients(gram.numpy(), np.ones(3)),
                               tja.PCGradWeighting()(gram).numpy(), rtol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_mgda_is_torchjds_min_norm_point_or_a_better_one(seed):
    jac = _jacobian(seed)
    gram = jac @ jac.T
    ours = build_weighting("mgda", NAMES).coefficients(gram.numpy(), np.ones(3))
    theirs = tja.MGDAWeighting(epsilon=1e-12, max_iters=10000)(gram).numpy()
    norm = lambda w: float(w @ gram.numpy() @ w)  # noqa: E731
    assert norm(ours) <= norm(theirs) + 1e-12  # torchjd's Frank-Wolfe may stop short
    np.testing.assert_allclose(ours @ jac.numpy(), theirs @ jac.numpy(), atol=1e-3)
