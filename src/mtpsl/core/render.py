"""Pictures and files of task maps, shared by the task classes, ``predict`` and the figures.

Nothing here knows a task type: each :class:`~mtpsl.tasks.Task` composes these helpers in its
own ``panels`` (figure cells) and ``save_prediction`` (files written by ``mtpsl predict``).
Only numpy at import; matplotlib and PIL are imported where they are used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mtpsl.core.files import atomic_write
from mtpsl.core.palette import (  # noqa: F401  (re-exported: the cells' and files' colours)
    DEPTH_PERCENTILES,
    UNLABELLED,
    colour_classes,
    colourise_depth,
    default_class_colours,
    depth_cmap,
    normals_rgb,
    unit_to_u8,
    voc_colours,
)
from mtpsl.core.palette import (
    class_colours as palette_class_colours,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Cell = tuple[np.ndarray, dict]
"""One figure panel: (array, imshow kwargs)."""


# ----------------------------------------------------------------------------- colours
# (the palette itself is mtpsl.core.palette; these are the cells the task classes compose)


def class_colours(num_classes: int) -> np.ndarray:
    """The default uint8 ``[num_classes, 3]`` class colours (:mod:`mtpsl.core.palette`: never
    black, black means void)."""
    return default_class_colours(num_classes)


def colour_segmentation(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``[H, W]`` class ids -> ``[H, W, 3]`` uint8 in the default class colours; ids outside
    ``[0, C)`` (ignore) :data:`~mtpsl.core.palette.VOID`."""
    return colour_classes(labels, default_class_colours(num_classes))


def colour_normals(normals: np.ndarray) -> np.ndarray:
    """``[3, H, W]`` unit vectors -> ``[H, W, 3]`` RGB ``(n + 1) / 2`` in [0, 1]; all-zero
    (invalid) black."""
    return normals_rgb(normals.transpose(1, 2, 0))


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


class OutputFiles:
    """Writes ``<stem>_<suffix>.png`` / ``.npy`` files of one image into a folder and keeps
    the list of what it wrote (``mtpsl predict`` reports it). ``colours`` maps a task name to
    the class colours its picture takes (a run's model card; see :meth:`class_colours`)."""

    def __init__(self, folder: Path, stem: str,
                 colours: Mapping[str, object] | None = None) -> None:
        self.folder, self.stem = Path(folder), stem
        self.colours = dict(colours or {})
        self.written: list[Path] = []

    def class_colours(self, task: str, num_classes: int) -> np.ndarray:
        """uint8 ``[num_classes, 3]`` colours of a class-map task's picture: the ones given
        for ``task`` where usable, else the palette's default
        (:func:`mtpsl.core.palette.class_colours`)."""
        given = self.colours.get(task)
        return palette_class_colours(num_classes, given)  # type: ignore[arg-type]

    def png(self, array: np.ndarray, suffix: str) -> None:
        from PIL import Image

        path = self.folder / f"{self.stem}_{suffix}.png"
        atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"))
        self.written.append(path)

    def npy(self, array: np.ndarray, suffix: str) -> None:
        path = self.folder / f"{self.stem}_{suffix}.npy"
        atomic_write(path, lambda f: np.save(f, array))
        self.written.append(path)


# ----------------------------------------------------------------------------- grids and keys

TITLE_PT = 9.0
"""Largest font size (points) of a panel's title (smaller only where a long one must fit)."""
KEY_PT = 8.0
"""Font size (points) of the keys below a grid."""
MIN_PT = 6.0
_CHAR_EM = 0.6
"""Average glyph width in em (DejaVu Sans), to fit text into inches without drawing it."""
_LINE_IN = 0.17
_KEY_TITLE_IN = 0.24


@dataclass
class Key:
    """What the colours of a group of panels mean, drawn below them: class swatches with
    names (``classes``), a colour bar (``cmap``/``vmin``/``vmax``, its title carrying the
    unit), the normals' colour disc (``normals``), or the title alone (none of these).
    ``note`` follows the title (e.g. what black means)."""

    title: str
    classes: list[tuple[str, tuple[float, float, float]]] = field(default_factory=list)
    cmap: Any = None
    vmin: float = 0.0
    vmax: float = 1.0
    normals: bool = False
    note: str = ""


def _text_in(text: str, points: float) -> float:
    """Approximate width (inches) of one line of ``text`` at ``points``."""
    return len(text) * _CHAR_EM * points / 72.0


def fit_points(lines: Sequence[str], width_in: float, largest: float = TITLE_PT) -> float:
    """The largest font size up to ``largest`` (at least :data:`MIN_PT`) at which every line
    fits ``width_in``."""
    longest = max((len(x) for x in lines), default=1) or 1
    fit = width_in * 72.0 / (_CHAR_EM * longest)
    return float(max(MIN_PT, min(largest, fit)))


def _class_columns(key: Key, width_in: float) -> tuple[int, float]:
    longest = max((len(name) for name, _ in key.classes), default=1)
    entry = 0.26 + _text_in("x" * longest, KEY_PT)
    ncol = max(1, min(len(key.classes), int(width_in // entry)))
    return ncol, width_in / ncol


def key_height(key: Key, width_in: float) -> float:
    """Height (inches) :func:`draw_key` needs for ``key`` at ``width_in``."""
    title_lines = len(_wrap(_key_title(key), width_in))
    top = _KEY_TITLE_IN + (title_lines - 1) * _LINE_IN
    if key.classes:
        ncol, _ = _class_columns(key, width_in)
        return top + math.ceil(len(key.classes) / ncol) * _LINE_IN + 0.06
    if key.normals:
        return top + 0.72
    return top + (0.5 if key.cmap is not None else 0.02)


def _key_title(key: Key) -> str:
    return f"{key.title} · {key.note}" if key.note else key.title


def _wrap(text: str, width_in: float) -> list[str]:
    """Words of ``text`` in lines that fit ``width_in`` at :data:`KEY_PT`."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and _text_in(f"{lines[-1]} {word}", KEY_PT) <= width_in:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def draw_key(fig: Figure, box: tuple[float, float, float, float], key: Key) -> None:
    """Draw ``key`` into ``box`` = (left, bottom, width, height) in inches of ``fig``."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    fw, fh = fig.get_size_inches()
    left, bottom, width, height = box

    def axes(x: float, y: float, w: float, h: float):
        return fig.add_axes((x / fw, y / fh, w / fw, h / fh))

    ax = axes(left, bottom, width, height)
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.set_axis_off()
    lines = _wrap(_key_title(key), width - 0.1)
    ax.text(0.05, height - 0.05, "\n".join(lines), fontsize=KEY_PT, va="top", ha="left",
            fontweight="bold")
    top = height - _KEY_TITLE_IN - (len(lines) - 1) * _LINE_IN
    if key.classes:
        ncol, col_w = _class_columns(key, width)
        nrow = math.ceil(len(key.classes) / ncol)
        for n, (name, colour) in enumerate(key.classes):
            c, r = divmod(n, nrow)  # down the columns
            x, y = 0.05 + c * col_w, top - (r + 1) * _LINE_IN
            ax.add_patch(Rectangle((x, y + 0.025), 0.16, 0.12, facecolor=colour,
                                   edgecolor="0.5", linewidth=0.5))
            ax.text(x + 0.22, y + 0.085, name, fontsize=KEY_PT, va="center", ha="left")
    elif key.normals:
        from mtpsl.core.palette import normals_key_image

        side = 0.62
        disc = axes(left + 0.25, bottom + top - side - 0.04, side, side)
        disc.imshow(normals_key_image(), extent=(-1, 1, -1, 1), interpolation="bilinear")
        disc.set_axis_off()
        ax.annotate("+x", (0.25 + side + 0.02, top - side / 2 - 0.04), fontsize=KEY_PT - 1,
                    va="center")
        ax.annotate("+y", (0.25 + side / 2, top - 0.02), fontsize=KEY_PT - 1, ha="center",
                    va="bottom")
        ax.text(0.25 + side + 0.3, top - 0.1,
                "RGB = (n + 1) / 2\nx → red, y → green,\nz → blue (disc: z ≥ 0)",
                fontsize=KEY_PT - 1, va="top", ha="left")
    elif key.cmap is not None:
        cax = axes(left + 0.12, bottom + top - 0.2, width - 0.24, 0.13)
        bar = fig.colorbar(ScalarMappable(Normalize(key.vmin, key.vmax), key.cmap), cax=cax,
                           orientation="horizontal")
        bar.ax.tick_params(labelsize=KEY_PT - 1, length=2, pad=1)
        bar.outline.set_linewidth(0.5)


def grid_height(n_rows: int, image_hw: tuple[int, int], cell_in: float, title_in: float,
                keys_in: float) -> float:
    """Height (inches) of :func:`panel_grid`'s figure: rows of image + title, then the keys."""
    h, w = image_hw
    return n_rows * (cell_in * h / w + title_in) + keys_in


def keys_height(keys: Sequence[tuple[int, int, Key]], cell_in: float) -> float:
    """Height (inches) of the row of keys below a grid (0 without keys)."""
    if not keys:
        return 0.0
    return max(key_height(key, span * cell_in - 0.1) for _, span, key in keys) + 0.1


def panel_grid(rows: Sequence[Sequence[Cell]], titles: Sequence[Sequence[str]],
               image_hw: tuple[int, int], width: float, cell_in: float, title_in: float,
               keys: Sequence[tuple[int, int, Key]] = (), dpi: int = 100) -> Figure:
    """Rows of titled image panels, each ``cell_in`` wide with the image's aspect, and below
    them a row of keys, ``(first column, columns spanned, key)`` each. A panel is ``(array,
    imshow kwargs)``; titles take :data:`TITLE_PT` points unless they must shrink to fit."""
    from matplotlib.figure import Figure

    h, w = image_hw
    cell_h = cell_in * h / w
    keys_in = keys_height(keys, cell_in)
    height = grid_height(len(rows), image_hw, cell_in, title_in, keys_in)
    fig = Figure(figsize=(width, height), dpi=dpi)
    pad = 0.03 * cell_in
    all_lines = [line for row in titles for t in row for line in t.split("\n")]
    points = fit_points(all_lines, cell_in - 2 * pad)
    for k, row in enumerate(rows):
        top = height - k * (cell_h + title_in) - title_in
        for c, (array, kwargs) in enumerate(row):
            ax = fig.add_axes(((c * cell_in + pad) / width, (top - cell_h + pad) / height,
                               (cell_in - 2 * pad) / width, (cell_h - 2 * pad) / height))
            ax.imshow(array, aspect="auto", interpolation="nearest", **kwargs)
            ax.set_title(titles[k][c], fontsize=points, pad=2, linespacing=1.1)
            ax.set_axis_off()
    for first, span, key in keys:
        draw_key(fig, (first * cell_in + 0.05, 0.05, span * cell_in - 0.1, keys_in - 0.1), key)
    return fig


def unify_scales(rows: Sequence[Sequence[Cell]], columns: Sequence[int]) -> None:
    """Put the cells of ``columns`` (one task's panels) on one colour scale over all rows:
    the smallest ``vmin`` and largest ``vmax`` among them (in place; cells without a scale
    are left alone). A figure's key then holds for every row."""
    scaled = [row[c][1] for row in rows for c in columns if "vmin" in row[c][1]]
    if not scaled:
        return
    vmin = min(float(k["vmin"]) for k in scaled)
    vmax = max(float(k["vmax"]) for k in scaled)
    for row in rows:
        for c in columns:
            if "vmin" in row[c][1]:
                row[c][1].update(vmin=vmin, vmax=vmax)
