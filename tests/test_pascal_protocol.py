"""The PASCAL-Context partial-label protocol (issue 31): its presets, the required ImageNet
weights, MTPSL's published split files, the scale-range / fixed-crop / photometric
augmentation, and a CLI run of the synthetic twin."""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import pytest
import torch

from mtpsl.core.config import load_config
from mtpsl.core.errors import ConfigError
from mtpsl.core.names import preflight
from mtpsl.core.signature import setup_from_config
from mtpsl.data.pascal import PASCAL_TASKS, pascal_tasks
from mtpsl.data.splits import Split, _load_pickled_npy
from mtpsl.data.transforms import (
    Compose,
    PhotometricJitter,
    RandomHorizontalFlip,
    RandomResizeCrop,
    build_train_transform,
    content_extent,
    fit_to_size,
    hsv_to_rgb,
    replay,
    rgb_to_hsv,
)
from mtpsl.engine.build import check_names

from conftest import TINY_TRAIN, final_metrics, shared_dir, train_cli

REAL = ("table_partial_pascal_onelabel", "table_partial_pascal_randomlabel")
TWINS = ("synthetic_partial_pascal_onelabel", "synthetic_partial_pascal_randomlabel")
TASKS = pascal_tasks(PASCAL_TASKS)


# ----------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", REAL)
def test_real_presets_follow_the_diffusionmtl_protocol(name):
    c = load_config(name)
    aug = c.dataset.augment
    assert (aug.scale_range, aug.crop_size, aug.cat_max_ratio) == ((0.5, 2.0), (512, 512), 0.75)
    assert aug.flip and aug.photometric and aug.scales == [1.0]
    assert (c.optim.optimizer, c.optim.lr, c.optim.weight_decay, c.optim.schedule) == (
        "adam", 2e-5, 1e-6, "poly")
    assert (c.train.epochs, c.train.batch_size, c.train.clip_norm) == (100, 6, 10.0)
    assert c.train.require_weights and c.model.backbone.weights is None
    assert (c.model.name, c.model.backbone.depth, c.model.backbone.output_stride) == (
        "resnet", 18, 8)
    assert c.dataset.options["loss_weights"] == {
        "semantic": 1.0, "parts": 2.0, "normal": 10.0, "saliency": 5.0, "edges": 50.0}
    assert c.compare.methods == ["stl", "sl", "xtc", "jtr", "diffusion_mtl", "hitts",
                                 "hitts_stage2"] and c.compare.seeds == [0, 1, 2]
    assert c.compare.variants["xtc"].options["mapper"] == "resnet18"
    assert c.model.backbone.normalize == "imagenet"  # the code's Normalize, for ImageNet weights
    variants = c.compare.variants
    assert variants["diffusion_mtl"].network == "diffusion_mtl"
    assert variants["hitts"].network == variants["hitts_stage2"].network == "hitts"
    assert variants["hitts_stage2"].options["teacher_from"] == "hitts"
    # HiTTs' PASCAL thresholds (configs/pascal/hitts.yml): parts 0.85, normals 0.7
    for variant in ("hitts", "hitts_stage2"):
        assert variants[variant].options["thresholds"] == {"parts": 0.85, "normal": 0.7}
    regime = "onelabel" if "one" in name else "random"
    assert c.compare.regimes == [regime] and c.labels.regime == regime
    published = "pascal_onelabel.npy" if "one" in name else "pascal_randomlabels.npy"
    assert Path(c.labels.file).name == published


@pytest.mark.parametrize(("twin", "real"), list(zip(TWINS, REAL, strict=True)))
def test_twins_mirror_their_preset_on_the_cpu(twin, real):
    t, r = load_config(twin), load_config(real)
    assert t.dataset.augment.scale_range == r.dataset.augment.scale_range
    assert (t.dataset.augment.photometric, t.dataset.augment.flip) == (True, True)
    assert t.dataset.augment.crop_size == tuple(t.dataset.options["size"])
    assert t.labels.file is None and t.labels.regime == r.labels.regime  # drawn, not the file
    assert (t.compare.methods, t.compare.seeds) == (r.compare.methods, r.compare.seeds)
    assert (t.optim.schedule, t.train.clip_norm) == ("poly", 10.0)
    assert not t.train.require_weights and t.model.name == "segnet"


# ----------------------------------------------------------------------------- weights


@pytest.mark.parametrize("name", REAL)
def test_missing_weights_stop_the_run_naming_the_key(name, tmp_path):
    config = load_config(name, [f"dataset.root={tmp_path}"])
    for check in (preflight, check_names):  # the CLI's fast check and the full one
        with pytest.raises(ConfigError, match=r"model\.backbone\.weights is not set.*"
                           r"train\.require_weights"):
            check(config)
    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(b"")
    check_names(load_config(name, [f"model.backbone.weights={weights}"]))
    check_names(load_config(name, ["train.require_weights=false"]))
    check_names(load_config(name, ["model.name=segnet"]))  # no encoder: nothing to require


def test_the_new_keys_leave_old_signatures_alone():
    setup = setup_from_config(load_config(None).model_dump())
    assert set(setup["dataset"]["augment"]) == {"scales", "flip"}
    assert "require_weights" not in setup["train"]
    on = setup_from_config(load_config(None, ["dataset.augment.photometric=true"]).model_dump())
    assert on["dataset"]["augment"]["photometric"] is True


# ----------------------------------------------------------------------------- split files


PUBLISHED = {  # counts per task, and images per number of labels (README of the shared data)
    "pascal_onelabel.npy": ({"semantic": 1000, "parts": 999, "normal": 1000, "saliency": 1000,
                             "edges": 999}, {1: 4998}),
    "pascal_randomlabels.npy": ({"semantic": 2450, "parts": 847, "normal": 2480,
                                 "saliency": 2445, "edges": 2557},
                                {1: 1538, 2: 1529, 3: 1541, 4: 390}),
}


@pytest.mark.parametrize("file", sorted(PUBLISHED))
def test_published_split_files_load_with_their_counts(file):
    path = shared_dir() / "data" / "reference-splits" / file
    if not path.is_file():
        pytest.skip(f"shared data not available at {path}")
    ids = sorted({str(i) for ids in _load_pickled_npy(path).values() for i in ids})
    assert len(ids) == 4998  # PASCAL-Context's training images
    split = Split.load(path, PASCAL_TASKS, ids)
    per_task, per_image = PUBLISHED[file]
    assert dict(zip(PASCAL_TASKS, split.labelled.sum(0).tolist(), strict=True)) == per_task
    counts = np.bincount(split.labelled.sum(1), minlength=6)
    assert {k: int(counts[k]) for k in range(6) if counts[k]} == per_image


# ----------------------------------------------------------------------------- config keys


@pytest.mark.parametrize(("override", "message"), [
    ("dataset.augment.scale_range=[2.0, 0.5]", r"scale_range: .*low <= high"),
    ("dataset.augment.scale_range=[0.01, 2.0]", r"scale_range: .*1/8 <= low"),
    ("dataset.augment.scale_range=[0.5]", r"scale_range"),
    ("dataset.augment.crop_size=[0, 64]", r"crop_size: .*each in \[1, 65536\]"),
    ("dataset.augment.cat_max_ratio=1.5", r"cat_max_ratio"),
    ("dataset.augment.cat_max_ratio=0.75", r"cat_max_ratio: needs crop_size"),
])
def test_bad_augment_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_scale_range_replaces_the_zoom():
    assert load_config(None, ["dataset.augment.scale_range=[0.5,2]"]).dataset.augment.scales \
        == [1.0]
    assert load_config(None).dataset.augment.scales == [1.0, 1.2, 1.5]  # unchanged default
    with pytest.raises(ConfigError, match=r"dataset\.augment\.scales: must be \[1.0\]"):
        load_config(None, ["dataset.augment.crop_size=[8,8]", "dataset.augment.scales=[1,1.5]"])


# ----------------------------------------------------------------------------- transforms


def _sample(h: int = 6, w: int = 8, canvas: tuple[int, int] = (10, 12), seed: int = 0) -> dict:
    """One PASCAL-like sample of ``h x w`` content padded to ``canvas`` as the dataset pads."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.nn.functional.normalize(torch.randn(3, h, w, generator=g), dim=0)
    item = {"image": torch.rand(3, h, w, generator=g) * 0.9 + 0.05,
            "semantic": torch.randint(0, 21, (h, w), generator=g),
            "parts": torch.randint(0, 7, (h, w), generator=g),
            "normal": normal,
            "saliency": torch.randint(0, 2, (1, h, w), generator=g).float(),
            "edges": torch.randint(0, 2, (1, h, w), generator=g).float()}
    padded = fit_to_size(item, TASKS, canvas)
    return {k: v[None] for k, v in padded.items()}


def test_content_extent_finds_the_datasets_padding():
    assert content_extent(_sample(6, 8), TASKS) == (6, 8)
    assert content_extent(_sample(10, 12), TASKS) == (10, 12)


def test_no_resize_crop_larger_than_the_content_pads_with_blank_labels():
    sample = _sample(6, 8)
    out = RandomResizeCrop((1.0, 1.0), (9, 11))(sample, TASKS, torch.Generator().manual_seed(0))
    assert out["crop"].tolist() == [[1.0, 0.0, 0.0, 6.0, 8.0]]
    assert torch.equal(out["image"][0, :, :6, :8], sample["image"][0, :, :6, :8])
    assert out["image"][0, :, 6:].eq(0).all() and out["image"][0, :, :, 8:].eq(0).all()
    for name in ("semantic", "parts"):
        expected = torch.full((9, 11), -1, dtype=torch.int64)
        expected[:6, :8] = sample[name][0, :6, :8]
        assert torch.equal(out[name][0], expected)
    expected = torch.zeros(3, 9, 11)
    expected[:, :6, :8] = sample["normal"][0, :, :6, :8]
    assert torch.equal(out["normal"][0], expected)
    assert out["saliency"][0, 0, 6:].eq(-1).all()  # saliency's blank value


def test_doubling_then_cropping_matches_the_hand_computed_geometry():
    sample = _sample(6, 8)
    for seed in range(4):
        out = RandomResizeCrop((2.0, 2.0), (5, 7))(sample, TASKS,
                                                    torch.Generator().manual_seed(seed))
        scale, top, left, h, w = out["crop"][0].tolist()
        assert (scale, h, w) == (2.0, 6, 8) and 0 <= top <= 12 - 5 and 0 <= left <= 16 - 7
        rows = (torch.arange(5) + int(top)) // 2  # nearest at x2: source pixel = floor(i / 2)
        cols = (torch.arange(7) + int(left)) // 2
        for name in ("semantic", "parts"):
            assert torch.equal(out[name][0], sample[name][0][rows][:, cols])
        assert torch.equal(out["normal"][0], sample["normal"][0][:, rows][:, :, cols])
        assert torch.allclose(out["normal"][0].norm(dim=0), torch.ones(5, 7))  # still unit


def test_halving_pads_the_shrunk_picture():
    sample = _sample(6, 8)
    out = RandomResizeCrop((0.5, 0.5), (10, 12))(sample, TASKS, torch.Generator())
    assert out["crop"].tolist() == [[0.5, 0.0, 0.0, 6.0, 8.0]]
    labelled = out["semantic"][0].ge(0)
    assert labelled[:3, :4].all() and not labelled[3:].any() and not labelled[:, 4:].any()
    assert torch.equal(out["semantic"][0, :3, :4], sample["semantic"][0, ::2, ::2][:3, :4])


def test_the_scale_is_drawn_uniformly_from_the_range():
    sample = _sample(10, 12)
    transform = RandomResizeCrop((0.5, 2.0), (10, 12))
    scales = [transform(sample, TASKS, torch.Generator().manual_seed(s))["crop"][0, 0].item()
              for s in range(64)]
    assert min(scales) >= 0.5 and max(scales) <= 2.0
    assert min(scales) < 0.7 and max(scales) > 1.8 and len(set(scales)) == 64


def test_flip_mirrors_the_crop_and_negates_normal_x():
    sample = _sample(6, 8)
    plain = Compose([RandomResizeCrop((0.7, 1.6), (8, 8))])
    flipped = Compose([RandomResizeCrop((0.7, 1.6), (8, 8)), RandomHorizontalFlip(1.0)])
    a = plain(sample, TASKS, torch.Generator().manual_seed(3))
    b = flipped(sample, TASKS, torch.Generator().manual_seed(3))
    assert torch.equal(a["crop"], b["crop"]) and b["flip"].item()
    assert torch.equal(b["semantic"], a["semantic"].flip(-1))
    assert torch.equal(b["normal"][:, 0], -a["normal"][:, 0].flip(-1))
    assert torch.equal(b["normal"][:, 1:], a["normal"][:, 1:].flip(-1))


def test_cat_max_ratio_redraws_crops_dominated_by_one_class():
    sample = _sample(8, 16, canvas=(8, 16))
    semantic = torch.zeros(1, 8, 16, dtype=torch.int64)
    semantic[0, :, 12:] = 5  # one class on 3/4 of the picture, another on the last quarter
    sample["semantic"] = semantic

    def shares(ratio: float | None) -> list[float]:
        transform = RandomResizeCrop((1.0, 1.0), (8, 8), cat_max_ratio=ratio)
        out = [transform(sample, TASKS, torch.Generator().manual_seed(s)) for s in range(16)]
        return [float(np.bincount(o["semantic"][0].flatten()).max() / 64) for o in out]

    assert max(shares(0.75)) < 0.75  # 16 seeds: some crop of 8 columns holds both classes
    assert max(shares(None)) == 1.0  # without it, crops of one class happen


def test_replay_of_a_resize_crop_reproduces_the_second_view():
    sample = _sample(6, 8)
    transform = build_train_transform((1.0,), True, scale_range=(0.5, 2.0), crop_size=(10, 12))
    g = torch.Generator().manual_seed(1)
    view0 = transform(sample, TASKS, g)
    for _ in range(4):
        view1 = transform(view0, TASKS, g)
        assert view1["crop"].shape == (1, 5)
        moved = replay(view0["image"], view1["crop"], view1["flip"])
        assert torch.equal(moved, view1["image"])
        normal = replay(view0["normal"], view1["crop"], view1["flip"], TASKS["normal"])
        valid = view1["normal"].norm(dim=1, keepdim=True) > 0
        # labels are nearest-sampled, maps bilinear: equal where the grids coincide
        assert normal.shape == view1["normal"].shape and valid.any()


def test_rgb_hsv_round_trip_agrees_with_colorsys():
    rgb = torch.rand(1, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    hsv = rgb_to_hsv(rgb)
    for y, x in [(0, 0), (2, 3), (4, 6)]:
        expected = colorsys.rgb_to_hsv(*rgb[0, :, y, x].tolist())
        assert hsv[0, :, y, x].tolist() == pytest.approx(list(expected), abs=1e-6)
    assert torch.allclose(hsv_to_rgb(hsv), rgb, atol=1e-6)


def test_photometric_jitter_changes_only_the_pictures_colours():
    sample = _sample(6, 8)
    jitter = Compose([PhotometricJitter()])
    outs = [jitter(sample, TASKS, torch.Generator().manual_seed(s)) for s in range(8)]
    again = jitter(sample, TASKS, torch.Generator().manual_seed(0))
    assert torch.equal(outs[0]["image"], again["image"])  # seeded
    for out in outs:
        for name in TASKS:
            assert torch.equal(out[name], sample[name])
        assert out["image"][0, :, 6:].eq(0).all() and out["image"][0, :, :, 8:].eq(0).all()
        assert 0.0 <= out["image"].min() and out["image"].max() <= 1.0
    assert sum(not torch.equal(o["image"], sample["image"]) for o in outs) >= 6


def test_photometric_steps_match_an_independent_computation():
    # zero saturation factor, no other change: each draw either keeps the image or greys it
    sample = _sample(6, 8)
    jitter = PhotometricJitter(brightness=0.0, contrast=(1.0, 1.0), saturation=(0.0, 0.0),
                               hue=0)
    content = sample["image"][0, :, :6, :8]
    grey = content.max(dim=0, keepdim=True).values.expand_as(content)  # HSV with S = 0: V
    seen = set()
    for s in range(8):
        out = jitter(sample, TASKS, torch.Generator().manual_seed(s))["image"][0, :, :6, :8]
        same, greyed = torch.allclose(out, content, atol=1e-6), torch.allclose(out, grey,
                                                                              atol=1e-6)
        assert same or greyed
        seen.add(greyed)
    assert seen == {True, False}


def test_default_pipeline_is_unchanged():
    transform = build_train_transform((1.0, 1.2, 1.5), True)
    kinds = [type(t).__name__ for t in transform.transforms]
    assert kinds == ["RandomScaleCrop", "RandomHorizontalFlip"]
    full = build_train_transform((1.0,), True, scale_range=(0.5, 2.0), crop_size=(4, 4),
                                 cat_max_ratio=0.75, photometric=True)
    assert [type(t).__name__ for t in full.transforms] == [
        "RandomResizeCrop", "RandomHorizontalFlip", "PhotometricJitter"]


# ----------------------------------------------------------------------------- CLI


@pytest.mark.slow
@pytest.mark.parametrize("twin", TWINS)
def test_the_twin_trains_through_the_cli(twin, tmp_path):
    from mtpsl.cli import main

    data = tmp_path / "data"
    assert main(["data", "synth", "--layout", "pascal_context", "--out", str(data),
                 "--n-train", "6", "--n-val", "2", "--height", "32", "--width", "48"]) == 0
    run = train_cli(tmp_path / "run", data, *TINY_TRAIN, "dataset.options.size=[32,48]",
                    "dataset.augment.crop_size=[32,48]", "method.name=xtc",
                    "train.max_steps_per_epoch=2", config=twin)
    metrics = final_metrics(run)
    assert set(metrics["metrics"]) >= {"semantic/miou", "edges/odsf_dilation"}
