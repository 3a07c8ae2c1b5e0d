"""The ``ssl`` baseline (Eq. 2 of paper 001): replay of recorded crops, consistency, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtpsl.core.errors import ConfigError
from mtpsl.data import DATASETS, PartialLabelSet
from mtpsl.data.batch import collate
from mtpsl.data.splits import make_split
from mtpsl.data.transforms import build_train_transform, replay
from mtpsl.methods import METHODS, build_method
from mtpsl.methods.ssl import crop_consistency
from mtpsl.models import HeadSpec, build_model
from mtpsl.tasks import build_task

from conftest import TINY, final_metrics, train_cli

H, W = 32, 48


@pytest.fixture(scope="module")
def dataset(shared_layout):
    return DATASETS.get("nyuv2")(shared_layout(n=6, h=H, w=W), "train")


def _batch(ds, labelled=None, flip=True, seed=0, scales=(1.0, 1.2, 1.5)):
    transform = build_train_transform(scales, flip=flip)
    items = PartialLabelSet(ds, ds.tasks, labelled, transform, n_views=2, seed=seed)
    return collate([items[i] for i in range(len(ds))], ds.task_names)


def _model(ds):
    heads = {n: HeadSpec.of(t) for n, t in ds.tasks.items()}
    torch.manual_seed(0)
    return build_model("segnet", heads, width=0.0625)


# --- replay ----------------------------------------------------------------------------------


@pytest.mark.parametrize("flip", [False, True])
def test_replay_maps_view0_onto_view1_exactly(dataset, flip):
    batch = _batch(dataset, flip=flip, seed=3)  # every label visible: nothing blanked
    v0, v1 = batch.views
    crop, flips = v1.meta["crop"], v1.meta["flip"]
    assert crop.shape == (len(batch), 3) and crop.is_floating_point()
    assert flips.shape == (len(batch),) and flips.dtype == torch.bool
    assert (crop[:, 0] > 1).any()  # some real zoom happened
    assert bool(flips.any()) == flip and not bool(flips.all())
    assert torch.equal(replay(v0.image, crop, flips, None), v1.image)
    normal = dataset.tasks["normal"]  # the bilinear (continuous) task
    assert normal.interpolation == "bilinear"
    assert torch.equal(replay(v0.targets["normal"], crop, flips, normal), v1.targets["normal"])
    # view0 carries its own record (the map from the raw image to view0)
    assert set(v0.meta) == {"crop", "flip"}


def test_replay_fixes_depth_and_normal_values():
    d, n = build_task("depth", "depth"), build_task("normal", "normal")
    crop = torch.tensor([[1.5, 2.0, 3.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    flips = torch.tensor([False, True])
    const = torch.full((2, 1, 12, 16), 6.0)
    torch.testing.assert_close(replay(const, crop, flips, d)[:, 0, 0, 0], torch.tensor([4.0, 6.0]))
    vec = F.normalize(torch.tensor([0.3, -0.5, 0.8]), dim=0).view(1, 3, 1, 1).expand(2, 3, 12, 16)
    out = replay(vec, crop, flips, n)
    torch.testing.assert_close(out[0], vec[0])
    torch.testing.assert_close(out[1, 0], -vec[1, 0])
    torch.testing.assert_close(out[1, 1:], vec[1, 1:])


def test_replay_is_differentiable():
    crop = torch.tensor([[1.5, 1.0, 2.0], [1.2, 0.0, 1.0]], dtype=torch.float64)
    flips = torch.tensor([True, False])
    x = torch.randn(2, 2, 6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: replay(t, crop, flips, None), (x,))


def test_replay_rejects_bad_shapes():
    with pytest.raises(ValueError):
        replay(torch.zeros(2, 4, 4), torch.zeros(2, 3), torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError):
        replay(torch.zeros(2, 1, 4, 4), torch.zeros(3, 3), torch.zeros(2, dtype=torch.bool))


# --- the consistency term --------------------------------------------------------------------


def _reference_consistency(tasks, batch, preds0, preds1, weight, normalize="sum"):
    """Eq. 2 with per-image loops and plain tensor ops (no replay, no masking tricks);
    ``normalize="mean"`` divides each image's terms by their number (the paper's 1/|U_n|)."""
    crop, flips = batch.views[1].meta["crop"], batch.views[1].meta["flip"]
    total = 0.0
    for i in range(len(batch)):
        image_terms = []
        s, top, left = (float(v) for v in crop[i])
        h, w = int(H / s), int(W / s)
        for k, name in enumerate(tasks):
            if batch.labelled[i, k]:
                continue
            p0, p1 = preds0[name][i], preds1[name][i]
            if name == "semantic":
                p0, p1 = p0.exp(), p1.exp()
            x = p0[:, int(top) : int(top) + h, int(left) : int(left) + w]
            if (h, w) != (H, W):
                x = F.interpolate(x[None], size=(H, W), mode="bilinear", align_corners=True)[0]
            if name == "depth":
                x = x / s
            if flips[i]:
                x = x.flip(-1)
                if name == "normal":
                    x = torch.cat([-x[:1], x[1:]])
            image_terms.append(F.mse_loss(x, p1))
        if image_terms:
            image_total = sum(image_terms)
            total = total + (image_total / len(image_terms) if normalize == "mean"
                             else image_total)
    return weight * total / len(batch)


@pytest.mark.parametrize("regime", ["onelabel", "random"])
def test_consistency_equals_per_image_reference_with_gradients(dataset, regime):
    split = make_split(regime, len(dataset), dataset.task_names, seed=1)
    batch = _batch(dataset, split.labelled, flip=True, seed=2)
    # eval: BN independent of the batch, so the views can also run apart; float64 so that the
    # comparison measures the formula, not float32 summation order
    model = _model(dataset).eval().double()
    for view in batch.views:
        view.image = view.image.double()
    method = build_method("ssl", dataset.tasks, {"weight": 0.7})
    losses, out = method.compute(model, batch)
    assert set(losses.tasks) == set(dataset.task_names) and set(losses.extra) == {"ssl"}
    preds0 = model(batch.views[0].image).preds
    preds1 = model(batch.views[1].image).preds
    for name in dataset.task_names:
        torch.testing.assert_close(out.preds[name], preds0[name], rtol=1e-5, atol=1e-6)
    ref = _reference_consistency(dataset.tasks, batch, preds0, preds1, 0.7)
    assert ref > 0
    torch.testing.assert_close(losses.extra["ssl"], ref, rtol=1e-5, atol=0)
    params = [p for p in model.parameters() if p.requires_grad]
    g_ours = torch.autograd.grad(losses.extra["ssl"], params, allow_unused=True)
    g_ref = torch.autograd.grad(ref, params, allow_unused=True)
    for a, b in zip(g_ours, g_ref, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_normalize_mean_divides_each_image_by_its_unlabelled_tasks(dataset):
    """The paper's 1/|U_n| of Eq. 2 (normalize=mean) against the per-image loop; the default
    (sum) is not it when an image has two unlabelled tasks."""
    labelled = np.array([[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 1, 0], [1, 0, 1], [0, 0, 1]],
                        dtype=bool)
    batch = _batch(dataset, labelled, flip=True, seed=3)
    model = _model(dataset).eval().double()
    for view in batch.views:
        view.image = view.image.double()
    preds0 = model(batch.views[0].image).preds
    preds1 = model(batch.views[1].image).preds
    ref = {n: _reference_consistency(dataset.tasks, batch, preds0, preds1, 0.7, n)
           for n in ("sum", "mean")}
    for normalize in ("sum", "mean"):
        method = build_method("ssl", dataset.tasks, {"weight": 0.7, "normalize": normalize})
        losses, _ = method.compute(model, batch)
        torch.testing.assert_close(losses.extra["ssl"], ref[normalize], rtol=1e-9, atol=0)
    assert ref["mean"] < ref["sum"] * 0.95


def test_one_forward_over_both_views_and_view0_output(dataset):
    batch = _batch(dataset, flip=False, seed=4)
    model = _model(dataset)
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    _, out = METHODS.get("ssl")(dataset.tasks, METHODS.get("ssl").Options()).compute(
        model, batch
    )
    assert calls == [2 * len(batch)]
    assert METHODS.get("ssl").n_views == 2
    assert all(p.shape[0] == len(batch) for p in out.preds.values())
    assert all(f.shape[0] == len(batch) for f in out.features.values())


def test_no_consistency_for_a_task_labelled_everywhere(dataset):
    labelled = np.zeros((len(dataset), 3), bool)
    labelled[:, 0] = True  # semantic labelled on every image
    batch = _batch(dataset, labelled, seed=5)
    g = torch.Generator().manual_seed(0)
    shapes = {"semantic": 13, "depth": 1, "normal": 3}
    preds = [
        {n: torch.randn(len(batch), c, H, W, generator=g).requires_grad_()
         for n, c in shapes.items()}
        for _ in range(2)
    ]
    preds[0]["semantic"] = F.log_softmax(preds[0]["semantic"].detach(), 1).requires_grad_()
    preds[1]["semantic"] = F.log_softmax(preds[1]["semantic"].detach(), 1).requires_grad_()
    per_image = crop_consistency(dataset.tasks, batch, *preds)
    per_image.sum().backward()
    for p in preds:
        assert p["semantic"].grad is None or not p["semantic"].grad.any()
        assert p["depth"].grad.abs().sum() > 0
    all_labelled = _batch(dataset, np.ones((len(dataset), 3), bool), seed=5)
    assert (crop_consistency(dataset.tasks, all_labelled, *preds) == 0).all()


def test_detach_target_stops_gradient_through_view0(dataset):
    batch = _batch(dataset, make_split("onelabel", len(dataset), dataset.task_names, 0).labelled)
    g = torch.Generator().manual_seed(1)
    preds = [
        {"semantic": F.log_softmax(torch.randn(len(batch), 13, H, W, generator=g), 1),
         "depth": torch.rand(len(batch), 1, H, W, generator=g),
         "normal": F.normalize(torch.randn(len(batch), 3, H, W, generator=g), dim=1)}
        for _ in range(2)
    ]
    for p in preds:
        for t in p.values():
            t.requires_grad_()
    plain = crop_consistency(dataset.tasks, batch, *preds)
    fixed = crop_consistency(dataset.tasks, batch, *preds, detach_target=True)
    torch.testing.assert_close(plain, fixed)
    fixed.sum().backward()
    assert all(t.grad is None for t in preds[0].values())
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in preds[1].values())


def test_missing_record_is_a_clear_error(dataset):
    items = PartialLabelSet(dataset, dataset.tasks)
    one = collate([items[0], items[1]], dataset.task_names)
    one.views.append(one.views[0])
    with pytest.raises(ValueError, match="crop"):
        build_method("ssl", dataset.tasks, {}).compute(_model(dataset), one)


# --- configuration and the CLI ---------------------------------------------------------------


def test_bad_option_names_the_config_key(dataset):
    with pytest.raises(ConfigError, match=r"method\.options\.wieght"):
        build_method("ssl", dataset.tasks, {"wieght": 1.0})
    with pytest.raises(ConfigError, match=r"method\.options\.weight"):
        build_method("ssl", dataset.tasks, {"weight": "heavy"})


def test_ssl_trains_end_to_end_from_the_cli(tmp_path, shared_layout):
    run = train_cli(tmp_path / "run", shared_layout(n=6, h=H, w=W), "method.name=ssl",
                    "method.options={weight: 0.5, detach_target: true}",
                    "dataset.augment.flip=true", "labels.regime=onelabel", *TINY, "optim.lr=1e-3")
    final = final_metrics(run)
    for key in ["semantic/miou", "depth/abs_err", "normal/mean"]:
        assert np.isfinite(final["metrics"][key])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train/ssl"] > 0
