"""Tests of the procedural ``synthetic`` dataset: geometry, labels, appearance, writers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mtpsl.data.synthetic import (
    class_names,
    map_19_to_7,
    render_indoor,
    render_street,
    write_cityscapes_layout,
    write_nyuv2_layout,
)

H, W = 48, 64


@pytest.mark.parametrize("render", [render_indoor, render_street])
def test_deterministic_by_seed(render) -> None:
    a, b, c = render(5, H, W), render(5, H, W), render(6, H, W)
    for key in ("image", "semantic", "depth", "normal", "edge"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["semantic"], c["semantic"])
    assert not np.array_equal(a["image"], c["image"])


@pytest.mark.parametrize("render", [render_indoor, render_street])
def test_output_types_and_ranges(render) -> None:
    out = render(1, 24, 32)
    assert out["image"].shape == (24, 32, 3) and out["image"].dtype == np.float32
    assert out["semantic"].shape == (24, 32) and out["semantic"].dtype == np.int64
    assert out["depth"].shape == (24, 32) and out["depth"].dtype == np.float32
    assert out["normal"].shape == (24, 32, 3) and out["normal"].dtype == np.float32
    assert out["edge"].shape == (24, 32) and out["edge"].dtype == np.uint8
    assert 0.0 <= out["image"].min() and out["image"].max() <= 1.0
    assert out["image"].std() > 0.02
    assert out["depth"].min() >= 0 and out["depth"].max() > 0
    n_cls = 13 if render is render_indoor else 7
    assert out["semantic"].min() >= -1 and out["semantic"].max() < n_cls


def test_street_label_versions_consistent() -> None:
    out = render_street(2, H, W)
    s19, s7 = out["semantic19"], out["semantic7"]
    assert s19.min() >= -1 and s19.max() <= 18 and s7.max() <= 6
    np.testing.assert_array_equal(s7, map_19_to_7(s19))
    np.testing.assert_array_equal(out["semantic"], s7)
    assert map_19_to_7(np.arange(-1, 19)).tolist() == [-1, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 5,
                                                       6, 6, 6, 6, 6, 6]
    assert len(class_names("indoor")) == 13 and len(class_names("street")) == 7
    assert len(class_names("cityscapes19")) == 19


@pytest.mark.parametrize("render", [render_indoor, render_street])
def test_resolution_independent_scene(render) -> None:
    for seed in (0, 1):
        small, big = render(seed, H, W), render(seed, 2 * H, 2 * W)
        a, b = small["semantic"], big["semantic"][1::2, 1::2]
        ok = (a >= 0) & (b >= 0)
        assert (a[ok] == b[ok]).mean() > 0.9


@pytest.mark.parametrize("render", [render_indoor, render_street])
def test_normals_unit_where_valid_zero_elsewhere(render) -> None:
    for seed in range(3):
        out = render(seed, H, W)
        norm = np.linalg.norm(out["normal"], axis=-1)
        valid = norm > 0
        assert valid.mean() > 0.5
        np.testing.assert_allclose(norm[valid], 1.0, atol=1e-4)
        # normals face the camera: negative dot product with the pixel's viewing ray
        k = out["intrinsics"]
        v, u = np.mgrid[0:H, 0:W] + 0.5
        ray = np.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], np.ones_like(u)], -1)
        assert ((out["normal"] * ray).sum(-1)[valid] < 1e-6).all()


def _backproject(depth: np.ndarray, k: np.ndarray) -> np.ndarray:
    h, w = depth.shape
    v, u = np.mgrid[0:h, 0:w] + 0.5
    return np.stack([(u - k[0, 2]) / k[0, 0] * depth, (v - k[1, 2]) / k[1, 1] * depth, depth], -1)


def test_normals_consistent_with_depth() -> None:
    angles = []
    for seed in range(4):
        out = render_indoor(seed, H, W)
        pts = _backproject(out["depth"].astype(np.float64), out["intrinsics"])
        est = -np.cross(pts[:-1, 1:] - pts[:-1, :-1], pts[1:, :-1] - pts[:-1, :-1])
        est /= np.linalg.norm(est, axis=-1, keepdims=True) + 1e-12
        inst, sem, d = out["instance"], out["semantic"], out["depth"]
        same = (inst[:-1, :-1] == inst[:-1, 1:]) & (inst[:-1, :-1] == inst[1:, :-1])
        ok = same & np.isin(sem[:-1, :-1], [4, 11]) & (d[:-1, :-1] > 0) & (d[:-1, 1:] > 0)
        ok &= d[1:, :-1] > 0
        cos = (est * out["normal"][:-1, :-1]).sum(-1)[ok]
        angles.append(np.degrees(np.arccos(np.clip(cos, -1, 1))))
    angles = np.concatenate(angles)
    assert angles.size > 500
    assert np.median(angles) < 5.0


def test_floor_normal_points_up_and_ceiling_down() -> None:
    seen_ceiling = False
    for seed in range(6):
        out = render_indoor(seed, H, W)
        ny = out["normal"][..., 1]  # camera y points down, so "up" is negative y
        floor, ceiling = out["semantic"] == 4, out["semantic"] == 2
        assert floor.any() and (ny[floor] < -0.9).all()
        if ceiling.any():
            seen_ceiling = True
            assert (ny[ceiling] > 0.9).all()
    assert seen_ceiling


def test_invalid_depth_on_windows_and_sky() -> None:
    windows = 0
    for seed in range(10):
        out = render_indoor(seed, H, W)
        glass = out["semantic"] == 12
        windows += glass.sum()
        assert (out["depth"][glass] == 0).all() and (out["normal"][glass] == 0).all()
        assert 0.03 < (out["depth"] == 0).mean() < 0.6  # dropout blobs + windows
    assert windows > 0
    for seed in range(3):
        out = render_street(seed, H, 2 * W)
        sky = out["semantic19"] == 10
        assert sky.any() and (out["depth"][sky] == 0).all()
        assert (out["normal"][sky] == 0).all()


def test_ignore_pixels_and_all_indoor_classes_appear() -> None:
    seen, ignore = set(), 0
    for seed in range(30):
        sem = render_indoor(seed, 24, 32)["semantic"]
        seen |= set(np.unique(sem).tolist())
        ignore += int((sem == -1).any())
    assert seen == set(range(-1, 13))
    assert ignore >= 3


def test_image_correlates_with_class() -> None:
    out = render_indoor(0, 2 * H, 2 * W)
    img, sem = out["image"], out["semantic"]
    means = [img[sem == c].mean(0) for c in np.unique(sem) if c >= 0 and (sem == c).sum() > 20]
    assert len(means) >= 2
    dist = max(np.abs(a - b).max() for i, a in enumerate(means) for b in means[i + 1:])
    assert dist > 0.1


@pytest.mark.parametrize("render", [render_indoor, render_street])
def test_style_b_same_geometry_different_rgb(render) -> None:
    a, b = render(3, H, W, style="a"), render(3, H, W, style="b")
    for key in ("semantic", "depth", "normal", "edge"):
        np.testing.assert_array_equal(a[key], b[key])
    assert np.abs(a["image"] - b["image"]).mean() > 0.03
    with pytest.raises(ValueError):
        render(3, H, W, style="c")


def test_edges_on_class_boundaries() -> None:
    for seed in range(3):
        out = render_indoor(seed, H, W)
        sem, edge = out["semantic"], out["edge"]
        diff = (sem[:, 1:] != sem[:, :-1]) & (sem[:, 1:] >= 0) & (sem[:, :-1] >= 0)
        assert diff.any()
        assert (edge[:, 1:][diff] == 1).all() and (edge[:, :-1][diff] == 1).all()
        diff_v = (sem[1:] != sem[:-1]) & (sem[1:] >= 0) & (sem[:-1] >= 0)
        assert (edge[1:][diff_v] == 1).all() and (edge[:-1][diff_v] == 1).all()
        assert set(np.unique(edge).tolist()) == {0, 1} and edge.mean() < 0.5


def test_write_nyuv2_layout(tmp_path) -> None:
    root = write_nyuv2_layout(tmp_path / "nyu", n_train=2, n_val=1, height=24, width=32,
                              seed=3, progress=False)
    shapes = {"image": ((24, 32, 3), np.float32), "label": ((24, 32), np.float32),
              "depth": ((24, 32, 1), np.float32), "normal": ((24, 32, 3), np.float32),
              "edge": ((24, 32), np.uint8)}
    for split, n in (("train", 2), ("val", 1)):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(shapes)
        for folder, (shape, dtype) in shapes.items():
            assert sorted(p.name for p in (root / split / folder).iterdir()) == [
                f"{i}.npy" for i in range(n)]
            arr = np.load(root / split / folder / "0.npy")
            assert arr.shape == shape and arr.dtype == dtype
    label = np.load(root / "train" / "label" / "1.npy")
    assert label.min() >= -1 and label.max() <= 12 and np.all(label == np.round(label))
    train0, val0 = np.load(root / "train/image/0.npy"), np.load(root / "val/image/0.npy")
    assert not np.array_equal(train0, val0)
    meta = json.loads((root / "synthetic.json").read_text())
    assert meta["family"] == "indoor" and meta["seed"] == 3 and len(meta["class_names"]) == 13


def test_write_cityscapes_layout(tmp_path) -> None:
    root = write_cityscapes_layout(tmp_path / "city", n_train=1, n_val=1, height=24, width=48,
                                   seed=0, with_edges=False, progress=False)
    for split in ("train", "val"):
        assert sorted(p.name for p in (root / split).iterdir()) == [
            "depth", "image", "label_19", "label_7"]
        depth = np.load(root / split / "depth" / "0.npy")
        assert depth.shape == (24, 48, 1) and depth.dtype == np.float32
        assert depth.min() == 0 and 0 < depth.max() <= 0.49
        l7, l19 = (np.load(root / split / f / "0.npy") for f in ("label_7", "label_19"))
        assert l7.shape == l19.shape == (24, 48) and l7.dtype == np.float32
        np.testing.assert_array_equal(l7, map_19_to_7(l19.astype(int)))
        assert np.load(root / split / "image" / "0.npy").shape == (24, 48, 3)
    assert json.loads((root / "synthetic.json").read_text())["family"] == "street"
