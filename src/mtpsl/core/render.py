"""Pictures and files of task maps, shared by the task classes, ``predict`` and the figures.

Nothing here knows a task type: each :class:`~mtpsl.tasks.Task` composes these helpers in its
own ``panels`` (figure cells) and ``save_prediction`` (files written by ``mtpsl predict``).
Only numpy at import; matplotlib and PIL are imported where they are used.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

Cell = tuple[np.ndarray, dict]
"""One figure panel: (array, imshow kwargs)."""
UNLABELLED = "tab:blue"
"""Colour of unlabelled pixels in binary-task panels (black and white are values there)."""
DEPTH_PERCENTILES = (2.0, 98.0)
"""Robust colour range of a written depth PNG."""


# ----------------------------------------------------------------------------- colours


@functools.lru_cache(maxsize=8)
def voc_colours(n: int) -> np.ndarray:
    """The PASCAL VOC bit-interleaved colours of ids ``0..n-1``, uint8 ``[n, 3]`` (id 0 black)."""
    colours = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, rgb = i, [0, 0, 0]
        for bit in range(8):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << (7 - bit)
            c >>= 3
        colours[i] = rgb
    colours.flags.writeable = False  # cached: callers index it, never edit it
    return colours


def class_colours(num_classes: int) -> np.ndarray:
    """Fixed uint8 ``[num_classes, 3]`` class colours of the figures (the VOC pattern from id
    1, so no class is black: black means ignore)."""
    return voc_colours(num_classes + 1)[1:]


def colour_segmentation(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``[H, W]`` class ids -> ``[H, W, 3]`` uint8; ids outside ``[0, C)`` (ignore) black."""
    valid = (labels >= 0) & (labels < num_classes)
    out = class_colours(num_classes)[np.where(valid, labels, 0)]
    out[~valid] = 0
    return out


def colour_normals(normals: np.ndarray) -> np.ndarray:
    """``[3, H, W]`` unit vectors -> ``[H, W, 3]`` RGB in [0, 1]; all-zero (invalid) black."""
    rgb = np.clip((normals.transpose(1, 2, 0) + 1.0) / 2.0, 0.0, 1.0)
    rgb[~np.any(normals != 0, axis=0)] = 0.0
    return rgb


def depth_cmap():
    """viridis with invalid (masked) ground-truth pixels black."""
    from matplotlib import colormaps

    return colormaps["viridis"].with_extremes(bad="black")


def binary_scale() -> dict:
    """Grey scale fixed to [0, 1] (1 white); masked (unlabelled) pixels :data:`UNLABELLED`."""
    from matplotlib import colormaps

    return {"cmap": colormaps["gray"].with_extremes(bad=UNLABELLED), "vmin": 0.0, "vmax": 1.0}


def binary_label_cell(label: np.ndarray) -> Cell:
    """A ``[1, H, W]`` binary label: 1 white, 0 black, any other value (unlabelled) masked."""
    valid = (label[0] == 0) | (label[0] == 1)
    return np.ma.masked_array(np.where(valid, label[0], 0.0), ~valid), binary_scale()


def probability_cell(pred: np.ndarray) -> Cell:
    """A ``[1, H, W]`` probability map in grey on the fixed [0, 1] scale."""
    return pred[0], binary_scale()


def depth_cells(label: np.ndarray | None, preds: list[np.ndarray]) -> list[Cell]:
    """``[1, H, W]`` depth label (0 or non-finite = invalid, masked) and predictions on one
    colour scale spanning the valid label values and every finite predicted value."""
    valid = None if label is None else (label[0] != 0) & np.isfinite(label[0])
    parts = ([] if label is None else [label[0][valid]]) + [p[0].ravel() for p in preds]
    values = np.concatenate(parts) if parts else np.zeros(0)
    values = values[np.isfinite(values)]
    vmin, vmax = (float(values.min()), float(values.max())) if values.size else (0, 1)
    scale = {"cmap": depth_cmap(), "vmin": vmin, "vmax": vmax}
    cells = [] if label is None or valid is None else [
        (np.ma.masked_array(label[0], ~valid), scale)]
    return cells + [(np.ma.masked_invalid(p[0]), scale) for p in preds]


def colourise_depth(depth: np.ndarray) -> np.ndarray:
    """(H,W) depth -> (H,W,3) uint8 'magma' image, scaled between robust percentiles."""
    from matplotlib import colormaps

    finite = depth[np.isfinite(depth)]
    lo, hi = np.percentile(finite, DEPTH_PERCENTILES) if finite.size else (0.0, 1.0)
    scaled = np.clip((depth - lo) / max(float(hi - lo), 1e-12), 0.0, 1.0)
    scaled = np.nan_to_num(scaled, nan=0.0)
    return (colormaps["magma"](scaled)[..., :3] * 255.0 + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------- files


def depth_to_mm16(depth: np.ndarray) -> np.ndarray:
    """Depth in metres -> uint16 millimetres, clipped to [0, 65535] (non-finite -> 0)."""
    mm = np.nan_to_num(depth.astype(np.float64) * 1000.0, nan=0.0, posinf=65535.0, neginf=0.0)
    return np.clip(np.rint(mm), 0, 65535).astype(np.uint16)


def probability_to_u8(prob: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> uint8 ``round(255 p)`` (NaN -> 0): a lossless-enough grey
    PNG (decoding as ``png / 255`` is off by at most 1/510)."""
    scaled = np.nan_to_num(prob.astype(np.float64), nan=0.0) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def unit_to_u8(vectors: np.ndarray) -> np.ndarray:
    """Unit vectors (H,W,3) in [-1, 1] -> uint8 RGB ``round((n + 1) / 2 * 255)``."""
    return np.clip(np.rint((vectors + 1.0) / 2.0 * 255.0), 0, 255).astype(np.uint8)


class OutputFiles:
    """Writes ``<stem>_<suffix>.png`` / ``.npy`` files of one image into a folder and keeps
    the list of what it wrote (``mtpsl predict`` reports it)."""

    def __init__(self, folder: Path, stem: str) -> None:
        self.folder, self.stem = Path(folder), stem
        self.written: list[Path] = []

    def png(self, array: np.ndarray, suffix: str) -> None:
        from PIL import Image

        path = self.folder / f"{self.stem}_{suffix}.png"
        Image.fromarray(array).save(path)
        self.written.append(path)

    def npy(self, array: np.ndarray, suffix: str) -> None:
        path = self.folder / f"{self.stem}_{suffix}.npy"
        np.save(path, array)
        self.written.append(path)
