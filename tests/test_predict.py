"""`mtpsl predict`: full-size predictions for PNG/JPEG files of any size, both modes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from mtpsl.cli import main
from mtpsl.inference.load import load_run, read_image
from mtpsl.inference.predict import (
    collect_images,
    palette,
    probability_to_u8,
    reflect_pad,
    tile_starts,
)

from conftest import TINY, train_cli

SIZES = {"a.png": (37, 53), "b.jpg": (100, 61), "c.JPEG": (20, 30)}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_root):
    run = tmp_path_factory.mktemp("predict") / "run"
    return train_cli(run, tiny_root, *TINY, "train.eval_every=1")


def _write_image(path, size, seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, (name, size) in enumerate(SIZES.items()):
        _write_image(folder / name, size, seed=i)
    (folder / "notes.txt").write_text("not an image")
    return folder


def _load(path):
    return np.asarray(Image.open(path))


@pytest.mark.parametrize("mode", ["resize", "tile"])
def test_predict_writes_every_output_at_the_original_size(run_dir, images, tmp_path, mode):
    out = tmp_path / "out"
    assert main(["predict", "--run", str(run_dir), str(images), "--out", str(out),
                 "--mode", mode, "--batch-size", "2", "--device", "cpu"]) == 0
    for name, (h, w) in SIZES.items():
        stem = name.split(".")[0]
        seg = _load(out / f"{stem}_semantic.png")
        ids = _load(out / f"{stem}_semantic_index.png")
        assert seg.shape == (h, w, 3) and ids.shape == (h, w) and ids.dtype == np.uint8
        assert ids.max() < 13
        np.testing.assert_array_equal(seg, palette()[ids])

        depth = np.load(out / f"{stem}_depth.npy")
        assert depth.shape == (h, w) and depth.dtype == np.float32
        assert _load(out / f"{stem}_depth.png").shape == (h, w, 3)
        mm = _load(out / f"{stem}_depth_16bit.png")
        assert mm.dtype == np.uint16 and mm.shape == (h, w)
        expected = np.clip(depth.astype(np.float64) * 1000.0, 0, 65535)
        assert np.abs(mm - expected).max() <= 1.0

        normal = np.load(out / f"{stem}_normal.npy")
        assert normal.shape == (h, w, 3) and normal.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(normal, axis=-1), 1.0, atol=1e-4)
        rgb = _load(out / f"{stem}_normal.png")
        assert rgb.shape == (h, w, 3)
        assert np.abs(rgb.astype(float) - (normal + 1) / 2 * 255).max() <= 0.5 + 1e-3
    assert not list(out.glob("notes*"))


@pytest.mark.parametrize("mode", ["resize", "tile"])
def test_an_image_at_input_size_gives_the_models_own_output(run_dir, tmp_path, mode):
    path = _write_image(tmp_path / "exact.png", (32, 48), seed=5)
    out = tmp_path / "out"
    assert main(["predict", "--run", str(run_dir), str(path), "--out", str(out),
                 "--mode", mode, "--device", "cpu"]) == 0
    loaded = load_run(run_dir)
    x = torch.from_numpy(read_image(path)).permute(2, 0, 1)[None]
    with torch.no_grad():
        preds = loaded.model(x).preds
    ids = _load(out / "exact_semantic_index.png")
    np.testing.assert_array_equal(ids, preds["semantic"][0].argmax(0).numpy())
    np.testing.assert_allclose(np.load(out / "exact_depth.npy"), preds["depth"][0, 0].numpy(),
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.load(out / "exact_normal.npy"),
                               preds["normal"][0].permute(1, 2, 0).numpy(), atol=1e-6)


def test_a_corrupt_image_is_a_one_line_error(run_dir, images, tmp_path, capsys):
    bad = images / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    assert main(["predict", "--run", str(run_dir), str(images), "--out",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "broken.png" in lines[0] and "Traceback" not in err


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_missing_inputs_are_data_errors(run_dir, tmp_path, capsys, make):
    target = tmp_path / "nothing-here"
    if make == "empty":
        target.mkdir()
        (target / "readme.txt").write_text("no images")
    assert main(["predict", "--run", str(run_dir), str(target), "--out",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nothing-here" in err


def test_collect_images_sorts_filters_and_rejects_clashing_stems(tmp_path):
    for name in ["b.PNG", "a.jpeg", "c.txt"]:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in collect_images([tmp_path])] == ["a.jpeg", "b.PNG"]
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(Exception, match="same outputs"):
        collect_images([tmp_path])


def test_tiles_cover_the_image_and_padding_reflects():
    for length, tile in [(48, 48), (53, 48), (100, 32), (61, 48)]:
        starts = tile_starts(length, tile)
        assert starts[0] == 0 and starts[-1] == length - tile
        assert all(b - a <= tile // 2 for a, b in itertools.pairwise(starts))
    image = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)
    padded = reflect_pad(image, 7, 8)
    assert padded.shape == (7, 8, 3)
    np.testing.assert_array_equal(padded[:2, :3], image)
    np.testing.assert_array_equal(padded[2, :3], image[0])  # reflection about the last row
    assert reflect_pad(np.ones((1, 1, 3), np.float32), 4, 5).shape == (4, 5, 3)


# ----------------------------------------------------------------------------- five tasks





@pytest.mark.parametrize("mode", ["resize", "tile"])
def test_five_task_outputs(pascal_run, images, tmp_path, mode):
    out = tmp_path / "out"
    assert main(["predict", "--run", str(pascal_run), str(images), "--out", str(out),
                 "--mode", mode, "--device", "cpu"]) == 0
    for name, (h, w) in SIZES.items():
        stem = name.split(".")[0]
        for task, classes in (("semantic", 21), ("parts", 7)):
            ids = _load(out / f"{stem}_{task}_index.png")
            assert ids.shape == (h, w) and ids.dtype == np.uint8 and ids.max() < classes
            np.testing.assert_array_equal(_load(out / f"{stem}_{task}.png"), palette()[ids])
        for task in ("saliency", "edges"):
            prob = np.load(out / f"{stem}_{task}.npy")
            assert prob.shape == (h, w) and prob.dtype == np.float32
            assert prob.min() >= 0 and prob.max() <= 1
            grey = _load(out / f"{stem}_{task}.png")
            assert grey.shape == (h, w) and grey.dtype == np.uint8
            assert np.abs(grey / 255.0 - prob).max() <= 1 / 255
        assert _load(out / f"{stem}_normal.png").shape == (h, w, 3)


def test_binary_png_decodes_to_the_models_probabilities(pascal_run, tmp_path):
    """At the input size the PNG is the model's own sigmoid output, 8-bit rounded."""
    path = _write_image(tmp_path / "exact.png", (32, 48), seed=7)
    out = tmp_path / "out"
    assert main(["predict", "--run", str(pascal_run), str(path), "--out", str(out),
                 "--device", "cpu"]) == 0
    loaded = load_run(pascal_run)
    x = torch.from_numpy(read_image(path)).permute(2, 0, 1)[None]
    with torch.no_grad():
        preds = loaded.model(x).preds
    for task in ("saliency", "edges"):
        expected = preds[task][0, 0].double().numpy()
        np.testing.assert_allclose(np.load(out / f"exact_{task}.npy"), expected, atol=1e-6)
        decoded = _load(out / f"exact_{task}.png").astype(np.float64) / 255.0
        assert np.abs(decoded - expected).max() <= 0.5 / 255 + 1e-6
    ids = _load(out / "exact_parts_index.png")
    np.testing.assert_array_equal(ids, preds["parts"][0].argmax(0).numpy())


def test_probability_to_u8_rounds_and_clips():
    prob = np.array([0.0, 1.0, 0.4 / 255, 0.6 / 255, 254.4 / 255, np.nan, 1.2, -0.1])
    np.testing.assert_array_equal(probability_to_u8(prob), [0, 255, 0, 1, 254, 0, 255, 0])


# ----------------------------------------------------------------------------- tiles, folders,
# panels


class _TileRamp(torch.nn.Module):
    """A 'model' whose depth is the column's position inside the tile, x / width: averaging
    tiles without a window leaves a step wherever a tile starts or ends."""

    def forward(self, x):
        from types import SimpleNamespace

        n, _, h, w = x.shape
        ramp = (torch.arange(w, dtype=torch.float32) / w).expand(n, 1, h, w)
        return SimpleNamespace(preds={"depth": ramp.clone()})


def test_tiles_are_blended_with_a_window_without_seams():
    from mtpsl.inference.predict import Predictor, tile_window
    from mtpsl.tasks import build_task

    th, tw, h, w = 8, 16, 8, 40
    predictor = Predictor(_TileRamp(), {"depth": build_task("depth", "depth")}, (th, tw),
                          torch.device("cpu"), batch_size=3, mode="tile")
    got = predictor.predict([np.zeros((h, w, 3), np.float32)])[0]["depth"]
    # the same blend written out in numpy: sum_t window * pred_t / sum_t window
    window = tile_window(th, tw)
    acc, weight = np.zeros((h, w)), np.zeros((h, w))
    for x0 in tile_starts(w, tw):
        acc[:, x0:x0 + tw] += window * (np.arange(tw) / tw)
        weight[:, x0:x0 + tw] += window
    np.testing.assert_allclose(got, acc / weight, atol=1e-6)
    # no seam: neighbouring columns differ by at most the ramp's own slope, where a plain
    # average of the tiles jumps by almost half the range at every tile border
    assert np.abs(np.diff(got, axis=1)).max() <= 1 / tw + 1e-6
    assert window.min() > 0 and window.max() == window[th // 2, tw // 2] <= 1  # peak inside


def test_a_constant_model_stays_constant_in_tile_mode():
    from types import SimpleNamespace

    from mtpsl.inference.predict import Predictor
    from mtpsl.tasks import build_task

    class Constant(torch.nn.Module):
        def forward(self, x):
            return SimpleNamespace(preds={"depth": torch.full((x.shape[0], 1, *x.shape[2:]),
                                                              2.5)})

    predictor = Predictor(Constant(), {"depth": build_task("depth", "depth")}, (8, 12),
                          torch.device("cpu"), mode="tile")
    got = predictor.predict([np.zeros((21, 50, 3), np.float32)])[0]["depth"]
    assert got.shape == (21, 50)
    np.testing.assert_allclose(got, 2.5, rtol=1e-6)


def test_a_folder_scan_leaves_out_labels_and_outputs_beside_their_images(tmp_path):
    names = ["a.jpg", "a_label.png", "a_depth_16bit.png", "b.png", "b_semantic.png",
             "b_semantic_index.png", "c_panel.png", "d_rgb.png", "notes.txt"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    skipped = []
    assert [p.name for p in collect_images([tmp_path], skipped=skipped)] == [
        "a.jpg", "b.png", "d_rgb.png"]
    assert sorted(p.name for p in skipped) == sorted(
        ["a_label.png", "a_depth_16bit.png", "b_semantic.png", "b_semantic_index.png",
         "c_panel.png"])
    # --glob names the images: then only those, nothing left out
    assert [p.name for p in collect_images([tmp_path], globs=["*_label.PNG", "b*"])] == [
        "a_label.png", "b.png", "b_semantic.png", "b_semantic_index.png"]
    # a file named on the command line is always an input
    assert collect_images([tmp_path / "a_label.png"]) == [tmp_path / "a_label.png"]


def test_predict_on_its_own_output_folder_predicts_only_the_images(run_dir, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    _write_image(folder / "room.png", (32, 48))
    args = ["predict", "--run", str(run_dir), str(folder), "--out", str(folder),
            "--device", "cpu"]
    assert main(args) == 0
    before = sorted(p.name for p in folder.iterdir())
    assert main(args) == 0  # the second pass must not predict room_semantic.png and others
    assert sorted(p.name for p in folder.iterdir()) == before
    assert "left out" in capsys.readouterr().err


def test_panel_shows_the_input_and_every_task_with_keys(run_dir, tmp_path, capsys):
    from mtpsl.inference.predict import PANEL_CELL_IN

    path = _write_image(tmp_path / "room.png", (40, 60), seed=3)
    out = tmp_path / "out"
    assert main(["predict", "--run", str(run_dir), str(path), "--out", str(out), "--panel",
                 "--device", "cpu"]) == 0
    assert str(out / "room_panel.png") in capsys.readouterr().out
    panel = _load(out / "room_panel.png")
    cells = 1 + 3  # the input, semantic, depth, normal
    assert panel.shape[1] == round(cells * PANEL_CELL_IN * 100)
    image_px = PANEL_CELL_IN * 100 * 40 / 60
    assert panel.shape[0] > image_px + 60  # titles above and keys below the pictures
    # the semantic picture in the panel is the PNG's colours: every colour of the PNG's
    # class map appears in the panel
    seg = _load(out / "room_semantic.png").reshape(-1, 3)
    colours = {tuple(c) for c in panel[..., :3].reshape(-1, 3)}
    assert {tuple(c) for c in seg} <= colours


@pytest.mark.parametrize("mode", ["resize", "tile"])
def test_resize_mode_says_when_images_are_not_the_training_size(run_dir, images, tmp_path,
                                                               capsys, mode):
    exact = _write_image(images / "exact.png", (32, 48), seed=7)
    assert main(["predict", "--run", str(run_dir), str(images), "--out", str(tmp_path / "o"),
                 "--mode", mode, "--device", "cpu"]) == 0
    warnings = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning")]
    if mode == "tile":  # tiles of the training size: nothing is rescaled
        assert warnings == []
        return
    assert warnings == [w for w in warnings if "the size the model was trained at" in w]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {len(SIZES)} of "
                                                         f"{len(SIZES) + 1} images are not 32x48")
    capsys.readouterr()
    assert main(["predict", "--run", str(run_dir), str(exact), "--out", str(tmp_path / "p"),
                 "--device", "cpu"]) == 0
    assert "warning" not in capsys.readouterr().err
