"""The docs' gallery: one picture of every figure kind mtpsl draws, from a tiny compare grid.

    python benchmarks/gallery.py                    # writes docs/gallery/*.png (a few minutes)
    python benchmarks/gallery.py --work /tmp/gal    # keep the data and runs there

Renders the built-in synthetic rooms (48 x 64), trains a tiny ``mtpsl compare`` grid (stl,
sl and xtc, two seeds, four epochs of a 1/8-width SegNet on 24 images: five minutes on
two CPU cores; the predictions are those of barely trained models, the pictures show what
each figure draws) and draws, each into
``docs/gallery/<kind>.png``: the training curves (``curves``), every seed per set-up
(``seeds``), the qualitative comparison (``qualitative``), the xtc run's joint task space
(``joint-space``), ``mtpsl predict --panel``'s side-by-side picture (``predict-panel``) and
the report's figure (``report``), each re-saved as optimised RGB (about 200 KB at most).
``docs/gallery.md`` shows them; ``tests/test_gallery.py`` runs :func:`render_all` on a
tiny grid so the gallery cannot silently break.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "gallery"
METHODS = ("stl", "sl", "xtc")
INDICES = (0, 1)
TRAIN = ["model.width=0.125", "train.epochs=4", "train.eval_every=1",
         "train.checkpoint_every=2", "train.batch_size=4", "train.eval_batch_size=8",
         "train.progress=false", "train.amp=off", "train.channels_last=false",
         "optim.lr=3e-3", "optim.step_size=1000"]


def cells(grid: Path) -> dict[str, list[Path]]:
    """Method -> its seeds' run folders in a compare grid of one regime."""
    out: dict[str, list[Path]] = {}
    for final in sorted(grid.rglob("final_metrics.json")):
        out.setdefault(final.parent.parent.name, []).append(final.parent)
    return out


def curves(grid: Path, out: Path) -> list[Path]:
    from mtpsl.analysis.figures.curves import plot_curve_groups

    return plot_curve_groups(cells(grid), out / "curves")


def seeds(grid: Path, out: Path) -> list[Path]:
    from mtpsl.analysis.figures.seeds import plot_seeds
    from mtpsl.analysis.report import build_report

    return plot_seeds(build_report([grid], "stl")["tables"][0], out / "seeds")


def report(grid: Path, out: Path) -> list[Path]:
    """``mtpsl report`` over the grid: its tables and figure land in ``out/report-files``;
    the figure is copied to ``out/report.png``."""
    from mtpsl.cli import main

    files = out / "report-files"
    if main(["report", str(grid), "--out", str(files)]) != 0:
        raise RuntimeError("mtpsl report failed")
    target = out / "report.png"
    shutil.copyfile(files / "report.png", target)
    return [target]


def qualitative(grid: Path, out: Path) -> list[Path]:
    from mtpsl.analysis.figures.qualitative import collect_qualitative, plot_qualitative

    runs = [cells(grid)[m][0] for m in METHODS if m in cells(grid)]
    data = collect_qualitative(runs, list(INDICES), device="cpu")
    return plot_qualitative(data, out / "qualitative")


def joint_space(grid: Path, out: Path) -> list[Path]:
    from mtpsl.analysis.figures.joint import collect_joint_space, plot_joint_space

    run = cells(grid)["xtc"][0]
    data = collect_joint_space(run, "semantic,depth", list(INDICES), device="cpu")
    return plot_joint_space(data, out / "joint-space")


def predict_panel(grid: Path, out: Path) -> list[Path]:
    """``mtpsl predict --panel`` on the first validation image (saved as a PNG) at twice
    the training size, tiled."""
    from PIL import Image

    from mtpsl.cli import main
    from mtpsl.inference.load import load_run

    run = cells(grid)["sl"][0]
    root = Path(load_run(run).config.dataset.root)
    pixels = np.load(root / "val" / "image" / f"{INDICES[0]}.npy")
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "room.png"
        big = Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8))
        big.resize((big.width * 2, big.height * 2), Image.Resampling.BICUBIC).save(image)
        preds = Path(tmp) / "out"
        if main(["predict", "--run", str(run), str(image), "--out", str(preds), "--panel",
                 "--mode", "tile", "--device", "cpu"]) != 0:
            raise RuntimeError("mtpsl predict failed")
        target = out / "predict-panel.png"
        shutil.copyfile(preds / "room_panel.png", target)
    return [target]


KINDS: dict[str, Callable[[Path, Path], list[Path]]] = {
    "curves": curves, "seeds": seeds, "qualitative": qualitative, "joint-space": joint_space,
    "predict-panel": predict_panel, "report": report,
}
"""Gallery picture -> the function drawing it from a compare grid into a folder."""


def render_all(grid: Path, out: Path) -> dict[str, Path]:
    """Every gallery picture of ``grid`` into ``out``: kind -> its PNG."""
    out.mkdir(parents=True, exist_ok=True)
    return {kind: next(p for p in draw(grid, out) if p.suffix == ".png")
            for kind, draw in KINDS.items()}


LIMIT = 256 * 1024
"""Largest PNG kept lossless; a larger one is quantised to 256 colours."""


def shrink(png: Path) -> None:
    """Re-save ``png`` as optimised RGB (lossless: matplotlib writes RGBA); quantise it to
    256 colours only if it is still over :data:`LIMIT` (that bands colour bars and the
    normals' disc, so only as a last resort)."""
    from PIL import Image

    with Image.open(png) as img:
        rgb = img.convert("RGB")
    rgb.save(png, optimize=True)
    if png.stat().st_size > LIMIT:
        rgb.quantize(colors=256, method=Image.Quantize.FASTOCTREE,
                     dither=Image.Dither.FLOYDSTEINBERG).save(png, optimize=True)


def train_grid(work: Path) -> Path:
    from mtpsl.cli import main
    from mtpsl.data.synthetic import write_nyuv2_layout

    data = work / "data"
    if not (data / "val").is_dir():
        write_nyuv2_layout(data, n_train=24, n_val=4, height=48, width=64)
    grid = work / "grid"
    code = main(["compare", "--config", "synthetic_demo", "--out", str(grid), "--methods",
                 ",".join(METHODS), "--regimes", "onelabel", "--seeds", "0,1",
                 f"dataset.root={data}", *TRAIN])
    if code != 0:
        raise RuntimeError("mtpsl compare failed")
    return grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="folder for data and runs (default: a "
                        "temporary one, removed afterwards)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        grid = train_grid(work)
        scratch = work / "figures"
        pictures = render_all(grid, scratch)
        args.out.mkdir(parents=True, exist_ok=True)
        for kind, png in pictures.items():
            target = args.out / f"{kind}.png"
            shutil.copyfile(png, target)
            shrink(target)
            print(f"wrote {target} ({target.stat().st_size // 1024} KB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
