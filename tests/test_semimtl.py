"""SemiMTL (seed 002): BerHu, the discriminator, the per-mode targets, D/G gradient isolation,
the optimiser groups, the depth metrics it reports, and `mtpsl train` end to end."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from mtpsl.cli import main
from mtpsl.core.config import OptimConfig
from mtpsl.data.batch import Batch, View
from mtpsl.data.cross_domain import write_synthetic_pair
from mtpsl.engine.checkpoint import load_checkpoint
from mtpsl.engine.optim import Optimisation
from mtpsl.methods import build_method
from mtpsl.methods.semimtl import (
    PatchDiscriminator,
    berhu_per_image,
    encode_target,
    semimtl_targets,
)
from mtpsl.metrics import DepthMetric
from mtpsl.models import build_model
from mtpsl.models.base import HeadSpec
from mtpsl.tasks import build_task

from conftest import TINY_TRAIN

TASKS = {
    "semantic": build_task("segmentation", "semantic", num_classes=7),
    "depth": build_task("depth", "depth"),
}
H, W = 32, 48


def test_berhu_matches_a_per_pixel_numpy_reference():
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(3, 1, 5, 6))
    target = rng.normal(size=(3, 1, 5, 6))
    valid = rng.random((3, 5, 6)) > 0.3
    valid[2] = False  # an image without valid pixels costs 0
    adiff = np.abs(pred - target)[:, 0]
    c = 0.2 * adiff[valid].max()
    expected = []
    for b in range(3):
        vals = [
            adiff[b, i, j] if adiff[b, i, j] <= c else (adiff[b, i, j] ** 2 + c**2) / (2 * c)
            for i in range(5)
            for j in range(6)
            if valid[b, i, j]
        ]
        expected.append(np.mean(vals) if vals else 0.0)
    got = berhu_per_image(torch.tensor(pred), torch.tensor(target), torch.tensor(valid))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)
    # Values outside the valid pixels do not move the threshold c.
    wild = pred.copy()
    wild[:, 0][~valid] = 1e6
    again = berhu_per_image(torch.tensor(wild), torch.tensor(target), torch.tensor(valid))
    np.testing.assert_allclose(again.numpy(), expected, rtol=1e-10)


def test_berhu_threshold_is_detached():
    pred = torch.tensor([[[[0.0, 1.0, 10.0]]]], requires_grad=True)
    loss = berhu_per_image(pred, torch.zeros_like(pred), torch.ones(1, 1, 3, dtype=torch.bool))
    loss.sum().backward()
    c = 2.0  # 0.2 * max |x|; d/dx of |x| is sign(x), of (x^2 + c^2) / 2c is x / c
    np.testing.assert_allclose(pred.grad.view(-1).numpy(), np.array([0.0, 1.0, 10.0 / c]) / 3)


def test_discriminator_architecture():
    width = 0.125
    disc = PatchDiscriminator(7, 3, width)
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) for c in convs)
    assert [parametrize.is_parametrized(c, "weight") for c in convs] == [True] * 4 + [False]
    slopes = [m.negative_slope for m in disc.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert slopes == [0.2] * 4
    chans = [7, 8, 16, 32, 64, 3]  # 64, 128, 256, 512 x 0.125, then the classes
    expected = sum(a * b * 16 + b for a, b in itertools.pairwise(chans))
    assert sum(p.numel() for p in disc.parameters()) == expected
    out = disc(torch.randn(2, 7, H, W))
    assert out.shape == (2, 3, H, W)


def _tiny_batch(labelled: list[list[bool]], domain: list[int]) -> Batch:
    g = torch.Generator().manual_seed(0)
    b = len(domain)
    image = torch.rand(b, 3, H, W, generator=g)
    sem = torch.randint(0, 7, (b, H, W), generator=g)
    depth = torch.rand(b, 1, H, W, generator=g) + 0.1
    lab = torch.tensor(labelled)
    sem[~lab[:, 0]] = -1
    depth[~lab[:, 1]] = 0.0
    return Batch(
        [View(image, {"semantic": sem, "depth": depth})],
        lab,
        torch.arange(b),
        ("semantic", "depth"),
        torch.tensor(domain),
    )


# A labels semantic only (domain 0), B depth only (domain 1): two images each.
PAIR = ([[True, False], [True, False], [False, True], [False, True]], [0, 0, 1, 1])


@pytest.mark.parametrize(
    ("mode", "inter_target"),
    [
        ("m1", [0.0, 1.0, 0.0]),  # semantic on B -> "prediction of A" (1 + 0)
        ("m2", [1.0, 0.0, 0.0]),  # -> ground truth
        ("m3", [0.5, 0.5, 0.0]),  # -> the joint of both
    ],
)
def test_semimtl_targets_per_mode(mode, inter_target):
    labelled = torch.tensor([True, True, False, False])
    domain = torch.tensor([0, 0, 1, 1])
    target, intra, inter = semimtl_targets(labelled, domain, 2, mode)
    assert intra.tolist() == [True, True, False, False]
    assert inter.tolist() == [False, False, True, True]
    np.testing.assert_allclose(target[:2].numpy(), [[1, 0, 0]] * 2)
    np.testing.assert_allclose(target[2:].numpy(), [inter_target] * 2)
    # depth is labelled on B (domain 1): in m1, A's predictions are pushed to class 2
    t_depth, intra_d, _ = semimtl_targets(~labelled, domain, 2, "m1")
    assert intra_d.tolist() == [False, False, True, True]
    np.testing.assert_allclose(t_depth[0].numpy(), [0, 0, 1])


def test_semimtl_targets_several_labelled_domains_and_none():
    domain = torch.tensor([0, 1, 2])
    target, _, inter = semimtl_targets(torch.tensor([True, True, False]), domain, 3, "m1")
    np.testing.assert_allclose(target[2].numpy(), [0, 0.5, 0.5, 0])
    assert inter.tolist() == [False, False, True]
    none = torch.zeros(3, dtype=torch.bool)
    for mode, expect in (("m1", False), ("m3", False), ("m2", True)):
        _, intra, inter = semimtl_targets(none, domain, 3, mode)
        assert not intra.any() and bool(inter.all()) is expect


def _model_and_method(name: str, **options):
    torch.manual_seed(0)
    heads = {n: HeadSpec.of(t) for n, t in TASKS.items()}
    model = build_model("segnet", heads, width=0.0625)
    method = build_method(name, TASKS, {"disc_width": 0.0625, **options})
    method.attach(model)
    return model, method


@pytest.mark.parametrize("mode", ["m1", "m2", "m3"])
def test_semimtl_terms_match_a_per_image_reference(mode):
    model, method = _model_and_method("semimtl", mode=mode, lambda_intra=0.3, lambda_inter=0.7)
    batch = _tiny_batch(*PAIR)
    method.eval()  # no spectral-norm power iteration: D is the same function in both passes
    losses, out = method.compute(model, batch)
    disc = method.discs["semantic"]
    pred = out.preds["semantic"].detach()
    real = encode_target(TASKS["semantic"], batch.targets["semantic"], pred)
    with torch.no_grad():
        fake_logits, real_logits = disc(pred.exp()), disc(real)

    def ce(logits, cls):  # mean over pixels of -log softmax[cls]
        return -F.log_softmax(logits, 0)[cls].mean().item()

    d_ref = np.mean([ce(real_logits[i], 0) for i in (0, 1)])  # ground truth of A
    d_ref += np.mean([ce(fake_logits[i], 1) for i in (0, 1)])  # predictions of A -> 1
    d_ref += np.mean([ce(fake_logits[i], 2) for i in (2, 3)])  # predictions of B -> 2
    inter = {
        "m1": [ce(fake_logits[i], 1) for i in (2, 3)],
        "m2": [ce(fake_logits[i], 0) for i in (2, 3)],
        "m3": [(ce(fake_logits[i], 0) + ce(fake_logits[i], 1)) / 2 for i in (2, 3)],
    }[mode]
    g_ref = 0.3 * np.mean([ce(fake_logits[i], 0) for i in (0, 1)]) + 0.7 * np.mean(inter)
    assert losses.extra["d_semantic"].item() == pytest.approx(d_ref, rel=1e-5)
    assert losses.extra["adv_semantic"].item() == pytest.approx(g_ref, rel=1e-5)


def test_semisd_pushes_only_unlabelled_images_to_ground_truth():
    model, method = _model_and_method("semisd", lambda_adv=0.5)
    batch = _tiny_batch(*PAIR)
    method.eval()
    losses, out = method.compute(model, batch)
    with torch.no_grad():
        logits = method.discs["depth"](
            out.preds["depth"]
            / out.preds["depth"].abs().flatten(1).amax(1).view(-1, 1, 1, 1).add(1e-6)
        )
    ref = np.mean([-F.log_softmax(logits[i], 0)[0].mean().item() for i in (0, 1)])
    assert losses.extra["adv_depth"].item() == pytest.approx(0.5 * ref, rel=1e-5)


def _touched(loss, g_params, d_params) -> tuple[bool, bool]:
    """(does ``loss`` reach the generator, does it reach D): non-zero gradients anywhere."""
    grads = torch.autograd.grad(loss, [*g_params, *d_params], retain_graph=True, allow_unused=True)

    def nonzero(gs):
        return any(g is not None and bool(g.abs().sum() > 0) for g in gs)

    return nonzero(grads[: len(g_params)]), nonzero(grads[len(g_params) :])


@pytest.mark.parametrize("name", ["semisd", "semimtl"])
def test_d_loss_never_updates_g_and_adversarial_loss_never_updates_d(name):
    model, method = _model_and_method(name)
    losses, _ = method.compute(model, _tiny_batch(*PAIR))
    g_params = list(model.parameters())
    d_params = list(method.discs.parameters())
    assert all(p.requires_grad for p in d_params)  # restored after the frozen pass
    for task in TASKS:
        assert _touched(losses.extra[f"d_{task}"], g_params, d_params) == (False, True)
        assert _touched(losses.extra[f"adv_{task}"], g_params, d_params) == (True, False)


def test_optimiser_groups_generator_sgd_discriminators_adam():
    model, method = _model_and_method("semimtl", disc_lr=3e-4)
    groups = method.optimizer_groups(model)
    cfg = OptimConfig(
        optimizer="sgd", lr=0.01, momentum=0.9, schedule="poly", poly_power=0.9, weight_decay=5e-4
    )
    optim = Optimisation.build(groups, cfg, epochs=10)
    gen, disc = optim.optimizers
    assert isinstance(gen, torch.optim.SGD) and gen.defaults["momentum"] == 0.9
    assert isinstance(disc, torch.optim.Adam) and disc.defaults["betas"] == (0.9, 0.99)
    assert disc.defaults["lr"] == 3e-4 and disc.defaults["weight_decay"] == 0.0
    d_ids = {id(p) for p in method.discs.parameters()}
    assert {id(p) for g in gen.param_groups for p in g["params"]}.isdisjoint(d_ids)
    assert {id(p) for g in disc.param_groups for p in g["params"]} == d_ids
    for _ in range(5):
        optim.end_epoch()
    assert gen.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**0.9)


def test_depth_metrics_match_numpy_brute_force():
    rng = np.random.default_rng(3)
    pred = rng.uniform(-0.2, 2.0, (2, 1, 6, 7))
    target = rng.uniform(0.1, 2.0, (2, 1, 6, 7))
    target[rng.random(target.shape) < 0.2] = 0.0
    metric = DepthMetric()
    metric.update(torch.tensor(pred[:1]), torch.tensor(target[:1]))
    metric.update(torch.tensor(pred[1:]), torch.tensor(target[1:]))
    got = metric.compute()
    p, g = pred[target != 0], target[target != 0]
    ratio = [max(a / b, b / a) if a > 0 else np.inf for a, b in zip(p, g, strict=True)]
    assert got["rel_err"] == pytest.approx(np.mean(np.abs(p - g) / g))
    assert got["rmse"] == pytest.approx(np.sqrt(np.mean((p - g) ** 2)))
    for k in (1, 2, 3):
        assert got[f"delta{k}"] == pytest.approx(100 * np.mean(np.array(ratio) < 1.25**k))


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def pair_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    write_synthetic_pair(
        root, layout="cityscapes", n_train=4, n_val=2, height=H, width=W, progress=False
    )
    return root


TINY = [
    *TINY_TRAIN,
    "train.device=cpu",
    "dataset.augment.scales=[1.0]",
]


@pytest.mark.parametrize(
    "variant",
    [
        ("jtl", []),
        ("jtl_stl", []),
        ("semisd", ["method.options.disc_width=0.0625"]),
        ("semimtl", ["method.options.disc_width=0.0625", "method.options.mode=m1"]),
        ("semimtl", ["method.options.disc_width=0.0625", "method.options.mode=m2"]),
        ("semimtl", ["method.options.disc_width=0.0625", "method.options.mode=m3"]),
    ],
)
def test_cli_trains_each_method_with_per_domain_metrics(pair_root, tmp_path, variant):
    name, extra = variant
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--config",
            "synthetic_semimtl",
            "--run-dir",
            str(run),
            f"dataset.root={pair_root}",
            f"method.name={name}",
            "method.options={}",
            *TINY,
            *extra,
        ]
    )
    assert code == 0
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["method"] == name
    for domain in ("A", "B"):  # every task evaluated on both sources
        metrics = final[f"metrics@{domain}"]
        for key in (
            "semantic/miou",
            "semantic/pixel_acc",
            "depth/rel_err",
            "depth/rmse",
            "depth/delta1",
            "depth/delta2",
            "depth/delta3",
        ):
            assert np.isfinite(metrics[key]), (domain, key)
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    adversarial = {"train/d_semantic", "train/adv_semantic", "train/d_depth", "train/adv_depth"}
    assert adversarial <= set(row) if "jtl" not in name else adversarial.isdisjoint(row)


def test_cli_rejects_a_mismatched_domain_count(pair_root, tmp_path, capsys):
    code = main(
        [
            "train",
            "--config",
            "synthetic_semimtl",
            "--run-dir",
            str(tmp_path / "r"),
            f"dataset.root={pair_root}",
            "method.options.n_domains=3",
            *TINY,
        ]
    )
    assert code == 2
    assert "method.options.n_domains" in capsys.readouterr().err


def test_semimtl_resume_matches_an_uninterrupted_run(pair_root, tmp_path):
    args = [
        f"dataset.root={pair_root}",
        *TINY,
        "method.options.disc_width=0.0625",
        "train.max_steps_per_epoch=2",
        "train.checkpoint_every=1",
        "optim.schedule=step",  # poly: extending train.epochs on resume is not exact (shared)
    ]
    base = ["train", "--config", "synthetic_semimtl"]
    assert main([*base, "--run-dir", str(tmp_path / "full"), *args, "train.epochs=2"]) == 0
    assert main([*base, "--run-dir", str(tmp_path / "part"), *args]) == 0
    assert main(["train", "--resume", str(tmp_path / "part"), "train.epochs=2"]) == 0
    full = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    part = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    for section in ("model", "method"):  # the discriminators (and their spectral norm) too
        assert any(k.startswith("discs.") for k in part["method"])
        for key, value in full[section].items():
            assert torch.equal(value, part[section][key]), key
