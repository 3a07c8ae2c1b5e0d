"""The docs' gallery script draws every figure kind from a compare grid (here a tiny one), so
the gallery cannot silently break."""

from __future__ import annotations

import pytest
from PIL import Image

from mtpsl.cli import main

from conftest import TINY_TRAIN, load_benchmark


@pytest.fixture(scope="module")
def gallery():
    return load_benchmark("gallery")


@pytest.fixture(scope="module")
def grid(tmp_path_factory, shared_layout, gallery):
    root = shared_layout(n=4, h=32, w=48)
    out = tmp_path_factory.mktemp("gallery") / "grid"
    assert main(["compare", "--config", "synthetic_demo", "--out", str(out), "--methods",
                 ",".join(gallery.METHODS), "--regimes", "onelabel", "--seeds", "0",
                 f"dataset.root={root}", *TINY_TRAIN, "train.epochs=2",
                 "train.eval_every=1", "train.checkpoint_every=1"]) == 0
    return out


def test_every_gallery_picture_is_drawn(gallery, grid, tmp_path):
    pictures = gallery.render_all(grid, tmp_path)
    assert list(pictures) == ["curves", "seeds", "qualitative", "joint-space",
                              "predict-panel", "report"]
    for kind, png in pictures.items():
        with Image.open(png) as img:
            w, h = img.size
        assert w > 300 and h > 150, kind
        gallery.shrink(png)
        assert png.stat().st_size <= gallery.LIMIT, kind
    # the docs page shows every picture the script draws, and nothing else
    page = (gallery.ROOT / "docs" / "gallery.md").read_text()
    shown = {line.split("(gallery/")[1].split(".png")[0]
             for line in page.splitlines() if line.startswith("![")}
    assert shown == set(gallery.KINDS)
    assert all((gallery.OUT / f"{kind}.png").is_file() for kind in gallery.KINDS)
