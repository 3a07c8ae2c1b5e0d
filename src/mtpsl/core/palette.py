"""The one palette of every picture mtpsl draws: ``mtpsl predict``'s PNGs and panels, the
figures of ``mtpsl figures`` and the task classes' figure cells all take their colours here.

* **Void** (ignored label pixels, invalid depth, all-zero normals) is :data:`VOID`, black;
  no class colour is ever black, so a black pixel always means "no value".
* **Classes** of a segmentation task: the colours recorded in the run's model card (written
  by training from this palette) where they are usable, else the PASCAL VOC bit-interleaved
  colours of ids ``1..C`` (:func:`default_class_colours`: class ``c`` gets VOC colour
  ``c + 1``, VOC's own black background is never used). Card colours holding black or two
  equal colours (checkpoints written before this palette) are replaced by the default.
* **Depth**: :data:`DEPTH_CMAP` (viridis: perceptually uniform, readable in grey and by
  colour-blind readers, and without black, which stays free for invalid pixels), near =
  dark blue-purple, far = yellow; every picture of depth carries its range in metres.
* **Normals**: RGB ``= (n + 1) / 2`` per component (x -> red, y -> green, z -> blue).
* **Binary maps** (saliency, edges): grey on a fixed [0, 1] scale (1 white), unlabelled
  pixels :data:`UNLABELLED`.

Only numpy at import; matplotlib is imported where a colour map is needed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

VOID = (0, 0, 0)
"""RGB of pixels without a value (ignore label, invalid depth, zero normals)."""
VOID_NAME = "void / ignored"
UNLABELLED = "tab:blue"
"""Colour of unlabelled pixels in binary-task panels (black and white are values there)."""
DEPTH_CMAP = "viridis"
"""Colour map of depth in figures, panels and ``predict``'s depth PNGs."""
DEPTH_UNIT = "m"
DEPTH_PERCENTILES = (2.0, 98.0)
"""Robust colour range of a depth PNG written by ``mtpsl predict`` (per image)."""
COSINE_CMAP = "magma"
"""Colour map of cosine similarities (the joint-space figure), on a fixed [0, 1] scale."""


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


def default_class_colours(num_classes: int) -> np.ndarray:
    """uint8 ``[num_classes, 3]``: class ``c`` gets VOC colour ``c + 1`` (never black)."""
    return voc_colours(num_classes + 1)[1:]


def usable_colours(colours: Sequence | np.ndarray | None, num_classes: int) -> bool:
    """``colours`` (e.g. a model card's) give every class its own colour, none of them void."""
    if colours is None:
        return False
    array = np.asarray(colours)
    if array.shape != (num_classes, 3) or array.min(initial=0) < 0 or array.max(initial=0) > 255:
        return False
    rows = {tuple(int(v) for v in c) for c in array}
    return len(rows) == num_classes and VOID not in rows


def class_colours(num_classes: int, given: Sequence | np.ndarray | None = None) -> np.ndarray:
    """uint8 ``[num_classes, 3]``: ``given`` (a model card's colours) where usable (see
    :func:`usable_colours`), else :func:`default_class_colours`."""
    if usable_colours(given, num_classes):
        return np.asarray(given, dtype=np.uint8).reshape(num_classes, 3)
    return default_class_colours(num_classes)


def colour_classes(labels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """``[H, W]`` class ids -> ``[H, W, 3]`` uint8 in ``colours``; ids outside
    ``[0, len(colours))`` (ignore) :data:`VOID`."""
    n = len(colours)
    valid = (labels >= 0) & (labels < n)
    out = np.asarray(colours, dtype=np.uint8)[np.where(valid, labels, 0).astype(np.int64)]
    out[~valid] = VOID
    return out


def class_names(names: Sequence[str] | None, num_classes: int) -> list[str]:
    """The names to show for ``num_classes`` classes: ``names`` where it has one per class,
    else ``class 0``, ``class 1``, ..."""
    if names is not None and len(names) == num_classes:
        return [str(n) for n in names]
    return [f"class {c}" for c in range(num_classes)]


def depth_cmap():
    """:data:`DEPTH_CMAP` with masked (invalid) pixels :data:`VOID`."""
    from matplotlib import colormaps

    return colormaps[DEPTH_CMAP].with_extremes(bad=np.array(VOID) / 255.0)


def depth_range(depth: np.ndarray) -> tuple[float, float]:
    """Robust (low, high) of a predicted depth map: its :data:`DEPTH_PERCENTILES` over finite
    values ((0, 1) when there are none; high > low always)."""
    finite = depth[np.isfinite(depth)]
    if not finite.size:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, DEPTH_PERCENTILES))
    return lo, max(hi, lo + 1e-6)


def colourise_depth(depth: np.ndarray, lo: float | None = None, hi: float | None = None
                    ) -> np.ndarray:
    """``[H, W]`` depth -> ``[H, W, 3]`` uint8 in :data:`DEPTH_CMAP`, scaled from ``lo`` to
    ``hi`` (default :func:`depth_range`); non-finite pixels :data:`VOID`."""
    from matplotlib import colormaps

    if lo is None or hi is None:
        lo, hi = depth_range(depth)
    scaled = np.clip((depth - lo) / max(float(hi - lo), 1e-12), 0.0, 1.0)
    rgb = (colormaps[DEPTH_CMAP](np.nan_to_num(scaled, nan=0.0))[..., :3] * 255.0 + 0.5)
    out = rgb.astype(np.uint8)
    out[~np.isfinite(depth)] = VOID
    return out


def normals_rgb(normals: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` unit vectors -> RGB ``(n + 1) / 2`` in [0, 1]; all-zero (invalid) black."""
    rgb = np.clip((normals + 1.0) / 2.0, 0.0, 1.0)
    rgb[~np.any(normals != 0, axis=-1)] = 0.0
    return rgb


def unit_to_u8(vectors: np.ndarray) -> np.ndarray:
    """Unit vectors ``[H, W, 3]`` in [-1, 1] -> uint8 RGB ``round((n + 1) / 2 * 255)`` (the
    encoding of :func:`normals_rgb`, in 8 bits)."""
    return np.clip(np.rint((vectors + 1.0) / 2.0 * 255.0), 0, 255).astype(np.uint8)


def normals_key_image(size: int = 64) -> np.ndarray:
    """RGBA ``[size, size, 4]`` float: the colour of every normal facing the viewer (x to the
    right, y up, z towards the viewer), a disc on a transparent background."""
    v, u = np.mgrid[1:-1:size * 1j, -1:1:size * 1j]
    r2 = u * u + v * v
    inside = r2 <= 1.0
    n = np.stack([u, v, np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))], axis=-1)
    rgba = np.zeros((size, size, 4))
    rgba[..., :3] = np.clip((n + 1.0) / 2.0, 0.0, 1.0)
    rgba[..., 3] = inside
    return rgba
