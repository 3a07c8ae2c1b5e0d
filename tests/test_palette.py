"""The one palette of predict's PNGs, its panels and the figures (mtpsl.core.palette), and the
keys drawn below a grid of panels (class legends, colour bars with units, the normals' disc)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib import colormaps

from mtpsl.core import palette, render
from mtpsl.core.render import Key, OutputFiles
from mtpsl.inference.panels import span_keys, task_key
from mtpsl.inference.predict import palette as predict_palette
from mtpsl.tasks import build_task


@pytest.mark.parametrize("n", [1, 7, 13, 19, 21, 40, 59, 255, 300])
def test_no_class_is_void_and_classes_differ(n):
    colours = palette.default_class_colours(n)
    rows = [tuple(int(v) for v in c) for c in colours]
    assert palette.VOID not in rows and len(set(rows)) == n
    # predict's PNG palette, the figures' cells and the model card's colours are one palette
    np.testing.assert_array_equal(predict_palette(n), colours)
    np.testing.assert_array_equal(build_task("segmentation", "s", num_classes=n)
                                  .prediction_palette(), colours)
    ids = np.arange(n).reshape(1, n)
    np.testing.assert_array_equal(render.colour_segmentation(ids, n)[0], colours)


def test_ignore_is_void_and_card_colours_are_used_only_when_usable():
    colours = palette.default_class_colours(3)
    labels = np.array([[0, 1, 2, -1, 3]])
    out = palette.colour_classes(labels, colours)
    np.testing.assert_array_equal(out[0, :3], colours)
    assert (out[0, 3:] == palette.VOID).all()
    mine = [[10, 20, 30], [40, 50, 60], [70, 80, 90]]
    np.testing.assert_array_equal(palette.class_colours(3, mine), mine)
    # an older checkpoint's VOC colours (class 0 black), repeated colours, a wrong count
    for bad in ([[0, 0, 0], [128, 0, 0], [0, 128, 0]], [[1, 1, 1]] * 3, mine[:2], None):
        np.testing.assert_array_equal(palette.class_colours(3, bad), colours)


def test_predict_pngs_take_the_cards_colours(tmp_path):
    task = build_task("segmentation", "semantic", num_classes=3)
    mine = [[10, 20, 30], [40, 50, 60], [70, 80, 90]]
    files = OutputFiles(tmp_path, "a", {"semantic": mine})
    ids = np.array([[0, 1], [2, 1]])
    task.save_prediction(ids, files)
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a_semantic.png")),
                                  np.asarray(mine, np.uint8)[ids])


def test_depth_is_viridis_with_void_invalid_and_normals_one_encoding():
    depth = np.array([[1.0, 2.0, 3.0, np.nan]])
    rgb = palette.colourise_depth(depth, 1.0, 3.0)
    expected = (colormaps["viridis"](np.array([0.0, 0.5, 1.0]))[:, :3] * 255 + 0.5)
    np.testing.assert_array_equal(rgb[0, :3], expected.astype(np.uint8))
    assert (rgb[0, 3] == palette.VOID).all()
    lo, hi = palette.depth_range(np.linspace(0, 10, 101))
    assert (lo, hi) == pytest.approx((0.2, 9.8))
    assert render.depth_cells(None, [np.ones((1, 2, 2))])[0][1]["cmap"].name.startswith(
        palette.DEPTH_CMAP)
    rng = np.random.default_rng(0)
    n = rng.normal(size=(4, 5, 3))
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    n[0, 0] = 0.0
    assert np.abs(palette.unit_to_u8(n)[1:] - palette.normals_rgb(n)[1:] * 255).max() <= 0.5
    np.testing.assert_array_equal(render.colour_normals(n.transpose(2, 0, 1)),
                                  palette.normals_rgb(n))
    assert (palette.normals_rgb(n)[0, 0] == 0).all()
    disc = palette.normals_key_image(33)
    centre = disc[16, 16, :3]  # the normal (0, 0, 1) at the centre of the disc
    np.testing.assert_allclose(centre, [0.5, 0.5, 1.0], atol=0.05)
    assert disc[0, 0, 3] == 0 and disc[16, -1, 0] > 0.95  # +x to the right: red


def _cells(task, target, preds):
    return task.panels(target, preds)


def test_keys_say_what_the_colours_mean():
    seg = build_task("segmentation", "semantic", num_classes=3)
    card = {"tasks": [{"name": "semantic", "class_names": ["bed", "books", "wall"],
                       "colours": None}]}
    key = task_key(seg, [], card)
    assert [name for name, _ in key.classes] == ["0 bed", "1 books", "2 wall",
                                                 palette.VOID_NAME]
    assert key.classes[0][1] == tuple(palette.default_class_colours(3)[0] / 255.0)
    assert [n for n, _ in task_key(seg, [], None, with_void=False).classes] == ["0", "1", "2"]
    depth = build_task("depth", "depth")
    label = torch.tensor([[[0.0, 2.0], [3.0, 4.0]]])
    cells = _cells(depth, label, [torch.full((1, 2, 2), 5.0)])
    key = task_key(depth, cells)
    assert "(m)" in key.title and (key.vmin, key.vmax) == (2.0, 5.0)
    assert task_key(build_task("normal", "normal"), []).normals
    sal = build_task("saliency", "saliency")
    key = task_key(sal, _cells(sal, None, [torch.rand(1, 2, 2)]))
    assert (key.vmin, key.vmax) == (0.0, 1.0) and "unlabelled" in key.note
    tasks = {"semantic": seg, "depth": depth}
    rows = [[(np.zeros((2, 2, 3)), {}), *_cells(seg, torch.zeros(2, 2).long(), []),
             *cells[:1]]]
    assert [(a, b) for a, b, _ in span_keys(tasks, rows, 1, 1)] == [(1, 1), (2, 1)]


def test_one_scale_per_task_over_the_rows_and_key_heights():
    a = {"cmap": "viridis", "vmin": 1.0, "vmax": 2.0}
    b = {"cmap": "viridis", "vmin": 0.5, "vmax": 1.5}
    rows = [[(np.zeros(1), {}), (np.zeros(1), a)], [(np.zeros(1), {}), (np.zeros(1), b)]]
    render.unify_scales(rows, [1])
    assert (a["vmin"], a["vmax"]) == (b["vmin"], b["vmax"]) == (0.5, 2.0)
    assert rows[0][0][1] == {}
    many = Key("semantic", classes=[(f"{c} name", (0.1, 0.2, 0.3)) for c in range(40)])
    assert render.key_height(many, 2.0) > render.key_height(many, 8.0)  # more columns
    assert render.key_height(Key("t", cmap="viridis"), 3) > render.key_height(Key("t"), 3)
    assert render.fit_points(["x" * 200], 1.0) == render.MIN_PT
    assert render.fit_points(["short"], 1.8) == render.TITLE_PT
