"""``mtpsl data prepare cityscapes``: MTAN's Cityscapes layout from the official packages.

``ROOT`` holds the unzipped ``leftImg8bit/``, ``gtFine/``, ``disparity/`` and (for metric
depth) ``camera/`` folders, each ``{split}/{city}/{city}_{seq}_{frame}_<suffix>``. Images are
taken city by city in sorted order, files sorted within a city (the order is recorded in
``prepare.json``), for the train (2975) and val (500) splits.

Per image: the RGB image resized (a block mean for the integer factors of 1024x2048 ->
128x256 or 256x512); ``label_19`` the 19 train ids and ``label_7`` the 7 categories minus one,
both from cityscapesscripts' label table, -1 for void; ``depth`` from the 16-bit disparity
PNG, whose value ``p`` means ``d = (p - 1) / 256`` pixels for ``p > 0`` and invalid for
``p = 0`` (the cityscapesScripts README), stored as one of (``--depth``):

- ``mtan`` (default): ``p / 65535``, the hypothesis that MTAN's "depth" is the PNG read by a
  reader that scales 16 bits to [0, 1]: it explains the maximum 0.4922 = 32257 / 65535 users
  measured in MTAN's files. Check it on one file of the release: every value v of
  ``depth/{i}.npy`` times 65535 is then an integer (``(v * 65535).round()`` equals
  ``v * 65535`` to 1e-3); under the rival reading ``d / 256`` it is ``v * 65536 + 1`` instead.
- ``pixels``: ``d`` scaled to the output width (disparity in pixels at that resolution).
- ``metric``: ``baseline * fx / d`` in metres, from each image's camera JSON.

All resized nearest (never a disparity that was not measured); 0 stays invalid.
Hypothesis for ``label_7`` (``--label7``): ``trainid`` (default) gives a pixel the category
of its train id, so every id without one (void, and the ignore-in-eval classes such as
parking, rail track, guard rail, caravan) is -1, as in ``mtpsl data synth``; ``category``
keeps those classes' categories. Check on one MTAN file: under ``trainid`` ``label_7`` is -1
wherever ``label_19`` is.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mtpsl.core.errors import DataError
from mtpsl.data.prepare import geometry
from mtpsl.data.prepare.common import PrepareRun, Summary, missing

PACKAGES = {
    "image": ("leftImg8bit", "_leftImg8bit.png", "leftImg8bit_trainvaltest.zip"),
    "label": ("gtFine", "_gtFine_labelIds.png", "gtFine_trainvaltest.zip"),
    "disparity": ("disparity", "_disparity.png", "disparity_trainvaltest.zip"),
    "camera": ("camera", "_camera.json", "camera_trainvaltest.zip"),
}
"""Input kind -> (folder under ROOT, file suffix, the official package that holds it)."""
SPLITS = ("train", "val")
RELEASE = {"train": 2975, "val": 500}
DEPTH_MODES = ("mtan", "pixels", "metric")
LABEL7_MODES = ("trainid", "category")
DEFAULT_SIZE = (128, 256)
FOLDERS = ("image", "label_7", "label_19", "depth")


def label_tables(label7: str = "trainid") -> tuple[np.ndarray, np.ndarray]:
    """labelId 0..255 -> (train id 0..18, category 0..6), -1 for void; -2 marks an id the
    label table does not know (a wrong file)."""
    try:
        from cityscapesscripts.helpers.labels import labels
    except ImportError:
        raise DataError("the Cityscapes label table comes from cityscapesscripts: pip install "
                        "'mtpsl[prepare]' (or pip install cityscapesscripts)") from None
    to19 = np.full(256, -2, dtype=np.int64)
    to7 = np.full(256, -2, dtype=np.int64)
    for lab in labels:
        if not 0 <= lab.id < 256:
            continue  # license plate (-1) never appears in a labelIds PNG
        has_train = lab.trainId not in (255, -1)
        to19[lab.id] = lab.trainId if has_train else -1
        keep = has_train if label7 == "trainid" else lab.categoryId > 0
        to7[lab.id] = lab.categoryId - 1 if keep else -1
    return to19, to7


def scan(root: Path, split: str) -> list[tuple[str, str]]:
    """(city, file stem) of every image of ``split``: cities sorted, files sorted in a city."""
    folder, suffix, _ = PACKAGES["image"]
    base = root / folder / split
    if not base.is_dir():
        if not (root / folder).is_dir():
            raise missing(root / folder, "the Cityscapes images", "cityscapes")
        raise DataError(f"{base} does not exist: {root / folder} lacks the {split} split")
    found: list[tuple[str, str]] = []
    for city in sorted(p.name for p in base.iterdir() if p.is_dir()):
        stems = sorted(p.name[: -len(suffix)] for p in (base / city).iterdir()
                       if p.name.endswith(suffix))
        found += [(city, stem) for stem in stems]
    if not found:
        raise DataError(f"{base} holds no */*{suffix} files")
    return found


def path_of(root: Path, kind: str, split: str, city: str, stem: str) -> Path:
    folder, suffix, _ = PACKAGES[kind]
    return root / folder / split / city / f"{stem}{suffix}"


def check_complete(root: Path, split: str, items: list[tuple[str, str]], kinds: list[str]) -> None:
    """Every image has its label, disparity (and camera) file, else one error naming it."""
    for kind in kinds:
        folder, _, package = PACKAGES[kind]
        if not (root / folder).is_dir():
            raise missing(root / folder, f"from {package}", "cityscapes")
        lacking = [path_of(root, kind, split, c, s) for c, s in items
                   if not path_of(root, kind, split, c, s).is_file()]
        if lacking:
            raise DataError(f"{lacking[0]} does not exist ({len(lacking)} of {len(items)} "
                            f"{split} {kind} files missing): an incomplete extraction of "
                            f"{package}?")


def _read_png(path: Path, modes: tuple[str, ...], what: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode not in modes:
                raise DataError(f"{path}: expected {what} (mode {' or '.join(modes)}), "
                                f"got mode {im.mode}")
            return np.asarray(im)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: not a readable PNG ({exc}); cut short?") from None


def read_camera(path: Path) -> tuple[float, float]:
    """(baseline in metres, fx in pixels) of a camera JSON."""
    try:
        cam = json.loads(path.read_text())
        baseline, fx = float(cam["extrinsic"]["baseline"]), float(cam["intrinsic"]["fx"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a Cityscapes camera file with extrinsic.baseline and "
                        f"intrinsic.fx ({exc!r})") from None
    if not (baseline > 0 and fx > 0):
        raise DataError(f"{path}: baseline {baseline} and fx {fx} must be positive")
    return baseline, fx


def decode_depth(p: np.ndarray, mode: str, width_out: int,
                 camera: tuple[float, float] | None = None) -> np.ndarray:
    """The stored value of every disparity pixel (full resolution, float64; 0 invalid)."""
    p = p.astype(np.float64)
    d = np.where(p > 0, (p - 1.0) / 256.0, 0.0)
    if mode == "mtan":
        return p / 65535.0
    if mode == "pixels":
        return d * (width_out / p.shape[1])
    assert camera is not None
    baseline, fx = camera
    return np.where(d > 0, baseline * fx / np.maximum(d, 1e-12), 0.0)


def _item(root: Path, split: str, city: str, stem: str, size: geometry.Size, depth: str,
          tables: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    img_path = path_of(root, "image", split, city, stem)
    rgb = _read_png(img_path, ("RGB",), "an RGB image")
    ids = _read_png(path_of(root, "label", split, city, stem), ("L", "P"), "8-bit label ids")
    disp_path = path_of(root, "disparity", split, city, stem)
    disp = _read_png(disp_path, ("I;16", "I", "I;16B"), "a 16-bit disparity PNG")
    for path, arr in ((path_of(root, "label", split, city, stem), ids), (disp_path, disp)):
        if arr.shape[:2] != rgb.shape[:2]:
            raise DataError(f"{path}: size {arr.shape[:2]} differs from its image's "
                            f"{rgb.shape[:2]} ({img_path})")
    to19, to7 = tables
    bad = to19[ids] == -2
    if bad.any():
        raise DataError(f"{path_of(root, 'label', split, city, stem)}: label ids "
                        f"{sorted(set(ids[bad].tolist()))[:10]} are not in the Cityscapes table")
    camera = read_camera(path_of(root, "camera", split, city, stem)) if depth == "metric" \
        else None
    value = decode_depth(disp, depth, size[1], camera)
    return {
        "image": np.clip(geometry.resize_image(rgb.astype(np.float64) / 255.0, size), 0, 1)
        .astype(np.float32),
        "label_7": geometry.resize_nearest(to7[ids], size).astype(np.float32),
        "label_19": geometry.resize_nearest(to19[ids], size).astype(np.float32),
        "depth": geometry.resize_nearest(value, size)[..., None].astype(np.float32),
    }


def prepare_cityscapes(
    root: Path,
    out: Path,
    *,
    size: geometry.Size = DEFAULT_SIZE,
    depth: str = "mtan",
    label7: str = "trainid",
    progress: bool = True,
    on_start: Callable[[str], None] | None = None,
) -> Summary:
    """Write ``OUT/{train,val}/{image,label_7,label_19,depth}/{i}.npy`` (module docstring)."""
    if depth not in DEPTH_MODES:
        raise ValueError(f"depth must be one of {DEPTH_MODES}, got {depth!r}")
    if label7 not in LABEL7_MODES:
        raise ValueError(f"label7 must be one of {LABEL7_MODES}, got {label7!r}")
    if not root.is_dir():
        raise missing(root, "the Cityscapes folder", "cityscapes")
    tables = label_tables(label7)
    kinds = ["image", "label", "disparity"] + (["camera"] if depth == "metric" else [])
    order = {split: scan(root, split) for split in SPLITS}
    for split, items in order.items():
        check_complete(root, split, items, kinds[1:])
    notes = [f"note: the official {split} split has {RELEASE[split]} images, {root} "
             f"{len(items)}: an incomplete download, or a subset"
             for split, items in order.items() if len(items) != RELEASE[split]]
    inputs = [(path.relative_to(root).as_posix(), path)
              for split, items in order.items() for city, stem in items for kind in kinds
              for path in [path_of(root, kind, split, city, stem)]]
    options = {"size": list(size), "depth": depth, "label7": label7,
               "resize": {"image": "area (integer factors) else bilinear", "label": "nearest",
                          "depth": "nearest"}}
    if on_start:
        on_start(f"cityscapes: {len(order['train'])} train, {len(order['val'])} val images "
                 f"from {root}; depth {depth}")
    run = PrepareRun(out, "cityscapes", options, inputs,
                     libraries=("numpy", "pillow", "cityscapesscripts"), progress=progress)
    total = sum(len(items) for items in order.values())
    with run.items(total, "cityscapes") as bar:
        for split, items in order.items():
            for i, (city, stem) in enumerate(items):
                names = {k: f"{split}/{k}/{i}.npy" for k in FOLDERS}
                if not run.done(names.values()):
                    arrays = _item(root, split, city, stem, size, depth, tables)
                    run.write({names[k]: arrays[k] for k in FOLDERS})
                bar.update(1)
    details: dict[str, Any] = {
        "splits": {split: {"images": len(items), "cities": _city_counts(items),
                           "order": [stem for _, stem in items]}
                   for split, items in order.items()},
        "labels": {"label_19": "cityscapesscripts trainId, 255 -> -1",
                   "label_7": f"categoryId - 1 ({label7}), void -> -1"},
        "depth": {"mtan": "disparity PNG p / 65535 (0 invalid)",
                  "pixels": "(p - 1) / 256 * output width / input width (0 invalid)",
                  "metric": "baseline * fx / ((p - 1) / 256) metres (0 invalid)"}[depth],
        "hypotheses": [
            "depth mtan: MTAN stored the 16-bit disparity PNG scaled to [0, 1] (p / 65535)",
            f"label_7 {label7}: see mtpsl.data.prepare.cityscapes",
            "{i}.npy order: cities sorted, files sorted within a city (order field)",
        ],
    }
    summary = run.finish(details)
    summary.notes.extend(notes)
    return summary


def _city_counts(items: list[tuple[str, str]]) -> list[list[Any]]:
    counts: dict[str, int] = {}
    for city, _ in items:
        counts[city] = counts.get(city, 0) + 1
    return [[city, n] for city, n in counts.items()]
