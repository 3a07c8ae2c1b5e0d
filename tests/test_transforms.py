"""Joint augmentation vs. a literal per-sample port of the reference RandomScaleCrop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mtpsl.data.transforms import (
    Compose,
    RandomHorizontalFlip,
    RandomScaleCrop,
    build_train_transform,
    replay,
)
from mtpsl.tasks import Task, build_task

H, W = 12, 16
TASKS: dict[str, Task] = {
    "semantic": build_task("segmentation", "semantic", num_classes=13),
    "depth": build_task("depth", "depth"),
    "normal": build_task("normal", "normal"),
}


def _batch(b: int = 3, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    normal = F.normalize(torch.randn(b, 3, H, W, generator=g), dim=1)
    depth = torch.rand(b, 1, H, W, generator=g) * 10
    depth[torch.rand(b, 1, H, W, generator=g) < 0.2] = 0
    return {
        "image": torch.rand(b, 3, H, W, generator=g),
        "semantic": torch.randint(-1, 13, (b, H, W), generator=g),
        "depth": depth,
        "normal": normal,
        "index": torch.arange(b),
        "available": torch.ones(b, 3, dtype=torch.bool),
    }


def _draw(g: torch.Generator, scales: tuple[float, ...]) -> tuple[float, int, int]:
    """The reference draw order (scale, top, left), from the same torch generator."""
    s = scales[int(torch.randint(len(scales), (1,), generator=g))]
    h, w = int(H / s), int(W / s)
    i = int(torch.randint(H - h + 1, (1,), generator=g))
    j = int(torch.randint(W - w + 1, (1,), generator=g))
    return s, i, j


def _reference(img: Tensor, label: Tensor, depth: Tensor, normal: Tensor, s: float, i: int, j: int):
    """The reference code, one sample ([3,H,W], [H,W], [1,H,W], [3,H,W]), verbatim semantics."""
    h, w = int(H / s), int(W / s)
    img_ = F.interpolate(
        img[None, :, i : i + h, j : j + w], size=(H, W), mode="bilinear", align_corners=True
    ).squeeze(0)
    label_ = (
        F.interpolate(label[None, None, i : i + h, j : j + w].float(), size=(H, W), mode="nearest")
        .squeeze(0)
        .squeeze(0)
        .long()
    )
    depth_ = F.interpolate(
        depth[None, :, i : i + h, j : j + w], size=(H, W), mode="nearest"
    ).squeeze(0)
    normal_ = F.interpolate(
        normal[None, :, i : i + h, j : j + w], size=(H, W), mode="bilinear", align_corners=True
    ).squeeze(0)
    return img_, label_, depth_ / s, normal_


def test_matches_reference_per_sample() -> None:
    batch = _batch(4)
    scales = (1.0, 1.2, 1.5)
    out = RandomScaleCrop(scales)(batch, TASKS, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    seen = set()
    for b in range(4):
        s, i, j = _draw(g, scales)
        seen.add(s)
        ref = _reference(
            batch["image"][b], batch["semantic"][b], batch["depth"][b], batch["normal"][b], s, i, j
        )
        for key, r in zip(("image", "semantic", "depth", "normal"), ref, strict=True):
            assert out[key][b].dtype == r.dtype
            assert torch.equal(out[key][b], r), (key, b, s)
    assert out["index"] is batch["index"] and out["available"] is batch["available"]


def test_same_seed_same_crops_and_shapes() -> None:
    batch = _batch(3)
    t = RandomScaleCrop()
    a = t(batch, TASKS, torch.Generator().manual_seed(1))
    b = t(batch, TASKS, torch.Generator().manual_seed(1))
    for k in ("image", "semantic", "depth", "normal"):
        assert torch.equal(a[k], b[k])
        assert a[k].shape == batch[k].shape and a[k].dtype == batch[k].dtype


@pytest.mark.parametrize("s", [1.2, 1.5, 2.0])
def test_depth_divided_by_scale_labels_kept(s: float) -> None:
    batch = _batch(2, seed=3)
    out = RandomScaleCrop((s,))(batch, TASKS, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    for b in range(2):
        _, i, j = _draw(g, (s,))
        h, w = int(H / s), int(W / s)
        # nearest sampling: each output pixel copies some crop pixel; depth values are those / s
        crop_depth = batch["depth"][b, 0, i : i + h, j : j + w]
        assert set(out["depth"][b].flatten().tolist()) <= set((crop_depth / s).flatten().tolist())
        args = (batch[k][b] for k in ("image", "semantic", "depth", "normal"))
        assert torch.equal(out["depth"][b], _reference(*args, s, i, j)[2])
        crop_label = batch["semantic"][b, i : i + h, j : j + w]
        assert out["semantic"].dtype == torch.int64
        assert set(out["semantic"][b].unique().tolist()) <= set(crop_label.unique().tolist())


def test_scale_one_is_identity() -> None:
    batch = _batch(3)
    out = RandomScaleCrop((1.0,))(batch, TASKS, torch.Generator().manual_seed(0))
    for k in ("image", "semantic", "depth", "normal"):
        assert torch.equal(out[k], batch[k])


def test_flip_mirrors_pixels_and_negates_normal_x() -> None:
    batch = _batch(2)
    out = RandomHorizontalFlip(p=1.0)(batch, TASKS, torch.Generator().manual_seed(0))
    assert torch.equal(out["image"], batch["image"].flip(-1))
    assert torch.equal(out["semantic"], batch["semantic"].flip(-1))
    assert torch.equal(out["depth"], batch["depth"].flip(-1))
    assert torch.equal(out["normal"][:, 0], -batch["normal"][:, 0].flip(-1))
    assert torch.equal(out["normal"][:, 1:], batch["normal"][:, 1:].flip(-1))


def test_flip_twice_is_identity_and_p0_noop() -> None:
    batch = _batch(4)
    flip = RandomHorizontalFlip(p=1.0)
    twice = flip(flip(batch, TASKS), TASKS)
    for k in ("image", "semantic", "depth", "normal"):
        assert torch.equal(twice[k], batch[k])
    none = RandomHorizontalFlip(p=0.0)(batch, TASKS, torch.Generator().manual_seed(0))
    assert all(torch.equal(none[k], batch[k]) for k in batch)


def test_flip_chooses_per_sample() -> None:
    batch = _batch(8)
    out = RandomHorizontalFlip(p=0.5)(batch, TASKS, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    chosen = [float(torch.rand((1,), generator=g)) < 0.5 for _ in range(8)]
    assert 0 < sum(chosen) < 8
    for b, c in enumerate(chosen):
        want = batch["image"][b].flip(-1) if c else batch["image"][b]
        assert torch.equal(out["image"][b], want)


def test_batch_equals_single_sample_calls() -> None:
    batch = _batch(3)
    t = build_train_transform(flip=True)
    out = t(batch, TASKS, torch.Generator().manual_seed(11))
    # singles: draw in the same order as the batch (all crops, then all flips)
    g_crop = torch.Generator().manual_seed(11)
    crops = [
        RandomScaleCrop()({k: v[b : b + 1] for k, v in batch.items()}, TASKS, g_crop)
        for b in range(3)
    ]
    flips = [RandomHorizontalFlip()(c, TASKS, g_crop) for c in crops]
    for k in ("image", "semantic", "depth", "normal"):
        assert torch.equal(out[k], torch.cat([f[k] for f in flips]))


def test_unbatched_sample_is_accepted() -> None:
    batch = _batch(1)
    single = {k: v[0] for k, v in batch.items()}
    a = RandomScaleCrop()(single, TASKS, torch.Generator().manual_seed(5))
    b = RandomScaleCrop()(batch, TASKS, torch.Generator().manual_seed(5))
    for k in ("image", "semantic", "depth", "normal"):
        assert a[k].shape == single[k].shape
        assert torch.equal(a[k], b[k][0])


def test_constant_normal_keeps_direction() -> None:
    batch = _batch(3)
    n = F.normalize(torch.tensor([0.3, -0.5, 0.8]), dim=0)
    batch["normal"] = n.view(1, 3, 1, 1).expand(3, 3, H, W).clone()
    out = RandomScaleCrop((1.2, 1.5))(batch, TASKS, torch.Generator().manual_seed(2))
    assert torch.allclose(out["normal"], batch["normal"], atol=1e-6)


def test_renormalize_normals_flag() -> None:
    batch = _batch(2)
    batch["normal"][:, :, ::2] = 0  # invalid rows: bilinear mixing shortens the vectors
    plain = RandomScaleCrop((1.5,))(batch, TASKS, torch.Generator().manual_seed(4))
    fixed = RandomScaleCrop((1.5,), renormalize_normals=True)(
        batch, TASKS, torch.Generator().manual_seed(4)
    )
    norms = fixed["normal"].norm(dim=1)
    nonzero = plain["normal"].norm(dim=1) > 0
    assert (plain["normal"].norm(dim=1)[nonzero] < 0.999).any()  # the reference quirk
    assert torch.allclose(norms[nonzero], torch.ones(()), atol=1e-5)
    assert (fixed["normal"].norm(dim=1)[~nonzero] == 0).all()
    assert torch.equal(fixed["depth"], plain["depth"])


def test_blank_targets_stay_blank_and_subset_of_tasks() -> None:
    batch = _batch(2)
    batch["semantic"][0] = -1
    batch["normal"][1] = 0
    del batch["depth"]  # a task absent from the sample is skipped
    out = Compose([RandomScaleCrop((1.5,)), RandomHorizontalFlip(1.0)])(
        batch, TASKS, torch.Generator().manual_seed(0)
    )
    assert (out["semantic"][0] == -1).all() and (out["normal"][1] == 0).all()
    assert "depth" not in out


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        RandomScaleCrop((0.5,))
    with pytest.raises(ValueError):
        RandomHorizontalFlip(1.5)


def test_transforms_record_crop_and_flip_per_sample() -> None:
    batch = _batch(4)
    out = build_train_transform(flip=True)(batch, TASKS, torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    crops = [_draw(g, (1.0, 1.2, 1.5)) for _ in range(4)]
    flips = [float(torch.rand((1,), generator=g)) < 0.5 for _ in range(4)]
    assert out["crop"].dtype == torch.float64 and out["crop"].shape == (4, 3)
    assert out["crop"].tolist() == [list(map(float, c)) for c in crops]
    assert out["flip"].dtype == torch.bool and out["flip"].tolist() == flips
    # identity records: no scale-crop in the Compose, or no flip
    only_flip = Compose([RandomHorizontalFlip(1.0)])(out, TASKS, torch.Generator())
    assert only_flip["crop"].tolist() == [[1.0, 0.0, 0.0]] * 4 and only_flip["flip"].all()
    only_crop = build_train_transform((1.5,))(out, TASKS, torch.Generator().manual_seed(0))
    assert not only_crop["flip"].any() and (only_crop["crop"][:, 0] == 1.5).all()
    assert set(Compose([])(batch, TASKS)) >= {"crop", "flip"}
    none = RandomHorizontalFlip(0.0)(batch, TASKS, torch.Generator())
    assert not none["flip"].any() and none["crop"].tolist() == [[1.0, 0.0, 0.0]] * 4


def test_unbatched_sample_records_unbatched_meta() -> None:
    single = {k: v[0] for k, v in _batch(1).items()}
    out = build_train_transform(flip=True)(single, TASKS, torch.Generator().manual_seed(3))
    assert out["crop"].shape == (3,) and out["flip"].shape == ()
    again = build_train_transform(flip=True)(out, TASKS, torch.Generator().manual_seed(4))
    assert again["crop"].shape == (3,) and again["flip"].shape == ()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_replay_of_view0_is_view1_for_image_and_bilinear_labels(seed: int) -> None:
    view0 = build_train_transform(flip=True)(_batch(6), TASKS, torch.Generator().manual_seed(9))
    view1 = build_train_transform(flip=True)(view0, TASKS, torch.Generator().manual_seed(seed))
    crop, flip = view1["crop"], view1["flip"]
    assert (crop[:, 0] > 1).any() and flip.any() and not flip.all()
    assert torch.equal(replay(view0["image"], crop, flip), view1["image"])
    assert torch.equal(replay(view0["normal"], crop, flip, TASKS["normal"]), view1["normal"])


def test_compose_rejects_a_crop_after_a_flip() -> None:
    with pytest.raises(ValueError, match="after a RandomHorizontalFlip"):
        Compose([RandomHorizontalFlip(), RandomScaleCrop()])
