"""Crop, resize and surface normals in plain numpy, so a prepared copy does not depend on the
Pillow or OpenCV version that made it and every rule can be checked by hand.

Pixel ``j`` of an axis of length ``n`` has its centre at ``j + 0.5``; resizing an axis from
``n_in`` to ``n_out`` maps output centre ``c`` to input position ``c * n_in / n_out`` (the
"half-pixel" convention of OpenCV's and PyTorch's ``align_corners=False``).
"""

from __future__ import annotations

import numpy as np

Size = tuple[int, int]
Box = tuple[int, int, int, int]
"""(top, bottom, left, right), 0-based, bottom and right exclusive (numpy slices)."""


def parse_size(text: str) -> Size:
    """``"288x384"`` -> (288, 384); one clear error for anything else."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"size must be HEIGHTxWIDTH, e.g. 288x384, got {text!r}")
    h, w = (int(p) for p in parts)
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {text!r}")
    return h, w


def parse_box(text: str) -> Box | None:
    """``"44:471,40:601"`` -> (44, 471, 40, 601); ``"none"`` -> None (no crop)."""
    if text.strip().lower() == "none":
        return None
    try:
        rows, cols = text.split(",")
        top, bottom = (int(v) for v in rows.split(":"))
        left, right = (int(v) for v in cols.split(":"))
    except ValueError:
        raise ValueError(f"crop must be TOP:BOTTOM,LEFT:RIGHT (0-based, end exclusive) or "
                         f"none, got {text!r}") from None
    if not (0 <= top < bottom and 0 <= left < right):
        raise ValueError(f"crop {text!r} is empty or negative")
    return top, bottom, left, right


def crop(arr: np.ndarray, box: Box | None) -> np.ndarray:
    """``arr[top:bottom, left:right]`` (any trailing axes kept); the box must fit."""
    if box is None:
        return arr
    top, bottom, left, right = box
    if bottom > arr.shape[0] or right > arr.shape[1]:
        raise ValueError(f"crop {box} does not fit an image of {arr.shape[0]}x{arr.shape[1]}")
    return arr[top:bottom, left:right]


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Input index under each output pixel centre: ``floor((j + 0.5) * n_in / n_out)``,
    in integers so no rounding can move a sample."""
    j = np.arange(n_out, dtype=np.int64)
    return ((2 * j + 1) * n_in) // (2 * n_out)


def resize_nearest(arr: np.ndarray, size: Size) -> np.ndarray:
    """Nearest neighbour (labels, depth, disparity: never a value that was not measured)."""
    rows = nearest_indices(arr.shape[0], size[0])
    cols = nearest_indices(arr.shape[1], size[1])
    return arr[rows][:, cols]


def _linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower index, upper index and upper weight of each output sample (edges clamped)."""
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0.0, n_in - 1.0)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, pos - lo


def resize_bilinear(arr: np.ndarray, size: Size) -> np.ndarray:
    """Bilinear with half-pixel centres, no antialiasing (float64 result)."""
    a = np.asarray(arr, dtype=np.float64)
    lo, hi, wt = _linear_weights(a.shape[0], size[0])
    shape = (-1,) + (1,) * (a.ndim - 1)
    a = a[lo] * (1 - wt).reshape(shape) + a[hi] * wt.reshape(shape)
    lo, hi, wt = _linear_weights(a.shape[1], size[1])
    shape = (1, -1) + (1,) * (a.ndim - 2)
    return a[:, lo] * (1 - wt).reshape(shape) + a[:, hi] * wt.reshape(shape)


def resize_area(arr: np.ndarray, size: Size) -> np.ndarray:
    """Mean over each block of input pixels; the factors must be integers (float64 result)."""
    h, w = arr.shape[:2]
    if h % size[0] or w % size[1]:
        raise ValueError(f"area resize needs integer factors, {h}x{w} -> {size[0]}x{size[1]}")
    fy, fx = h // size[0], w // size[1]
    a = np.asarray(arr, dtype=np.float64).reshape(size[0], fy, size[1], fx, *arr.shape[2:])
    return a.mean(axis=(1, 3))


def resize_image(arr: np.ndarray, size: Size) -> np.ndarray:
    """Images: block mean when the factors are integers (a clean 8x or 4x downscale, no
    aliasing), else bilinear (NYUv2's 427x561 crop to 288x384 is 0.67x: mild)."""
    h, w = arr.shape[:2]
    if h % size[0] == 0 and w % size[1] == 0:
        return resize_area(arr, size)
    return resize_bilinear(arr, size)


def image_method(shape: Size, size: Size) -> str:
    """Name of the rule :func:`resize_image` applies (for the manifest)."""
    if shape == size:
        return "none"
    return "area" if shape[0] % size[0] == 0 and shape[1] % size[1] == 0 else "bilinear"


def resize_normals(normal: np.ndarray, valid: np.ndarray, size: Size) -> np.ndarray:
    """Unit normals resized bilinearly and renormalised; an output pixel is valid only when
    all its input neighbours are (no blend with invalid ones). Invalid pixels are all-zero."""
    vec = np.where(valid[..., None], normal.astype(np.float64), 0.0)
    out = resize_bilinear(vec, size)
    ok = resize_bilinear(valid.astype(np.float64), size) >= 1.0 - 1e-9
    norm = np.linalg.norm(out, axis=-1, keepdims=True)
    ok &= norm[..., 0] > 1e-6
    return np.where(ok[..., None], out / np.maximum(norm, 1e-12), 0.0)


def normals_from_depth(
    depth: np.ndarray, fx: float, fy: float, cx: float, cy: float, step: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Surface normals of a metric depth map (camera frame: x right, y down, z forward; the
    normal faces the camera) and their validity.

    Each pixel is back-projected, ``P = ((u - cx) z / fx, (v - cy) z / fy, z)`` with ``u, v``
    the 0-based column and row; the normal is the cross product of the central differences
    ``P[v, u + step] - P[v, u - step]`` and ``P[v + step, u] - P[v - step, u]`` (a wider step
    averages out the depth quantisation). Valid where the pixel and those four neighbours have
    depth.
    """
    k = int(step)
    z = np.asarray(depth, dtype=np.float64)
    h, w = z.shape
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    pts = np.stack([(u - cx) * z / fx, (v - cy) * z / fy, z], axis=-1)
    du = np.zeros_like(pts)
    dv = np.zeros_like(pts)
    du[:, k:-k] = pts[:, 2 * k:] - pts[:, :-2 * k]
    dv[k:-k] = pts[2 * k:] - pts[:-2 * k]
    n = np.cross(du, dv)
    # cross(right, down) points away from the camera for a fronto-parallel plane: flip so
    # every normal faces the viewer (n . P < 0)
    n = np.where((np.sum(n * pts, axis=-1) > 0)[..., None], -n, n)
    has = z > 0
    valid = np.zeros_like(has)
    valid[k:-k, k:-k] = (has[k:-k, k:-k] & has[:-2 * k, k:-k] & has[2 * k:, k:-k]
                         & has[k:-k, :-2 * k] & has[k:-k, 2 * k:])
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    valid &= norm[..., 0] > 0
    return np.where(valid[..., None], n / np.maximum(norm, 1e-12), 0.0), valid
