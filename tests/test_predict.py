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
