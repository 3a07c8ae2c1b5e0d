"""What the colours of a task's panels mean: the key drawn below them, shared by
``mtpsl predict --panel`` and the figures (``mtpsl figures``), from the run's model card (class
names and colours) and the task's type."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mtpsl.core.palette import (
    DEPTH_UNIT,
    UNLABELLED,
    VOID,
    VOID_NAME,
    class_colours,
    class_names,
)
from mtpsl.core.render import Cell, Key
from mtpsl.tasks import Task, task_kind


def card_entry(card: Mapping | None, task: str) -> Mapping[str, Any]:
    """The model card's entry of ``task`` ({} without a card or entry)."""
    for entry in (card or {}).get("tasks", []) or []:
        if isinstance(entry, Mapping) and entry.get("name") == task:
            return entry
    return {}


def card_colours(card: Mapping | None) -> dict[str, Any]:
    """Task name -> class colours recorded in the model card (where it records them)."""
    return {entry["name"]: entry["colours"] for entry in (card or {}).get("tasks", []) or []
            if isinstance(entry, Mapping) and entry.get("colours") is not None}


def _rgb(colour: Sequence[int]) -> tuple[float, float, float]:
    r, g, b = (int(v) / 255.0 for v in colour)
    return (r, g, b)


def task_key(task: Task, cells: Sequence[Cell], card: Mapping | None = None,
             with_void: bool = True) -> Key | None:
    """The key of one task's panels ``cells`` (their scales are read from the cells): class
    names and colours for a class map (``with_void`` adds the void swatch, for panels that
    show labels), a colour bar in metres for depth, the colour disc for normals, a [0, 1]
    bar for probability maps; None for a task type with no scale to explain."""
    kind = task_kind(task) or ""
    name = task.name
    scales = [kw for _, kw in cells if "vmin" in kw and "cmap" in kw]
    if kind == "segmentation":
        entry = card_entry(card, name)
        n = int(task.out_channels)
        colours = class_colours(n, entry.get("colours"))
        names = class_names(entry.get("class_names"), n)
        classes = [(f"{c} {label}" if label != f"class {c}" else str(c), _rgb(colour))
                   for c, (label, colour) in enumerate(zip(names, colours, strict=True))]
        if with_void:
            classes.append((VOID_NAME, _rgb(VOID)))
        return Key(f"{name}: classes", classes=classes)
    if kind == "normal":
        return Key(f"{name}: surface normal", normals=True, note="black: invalid")
    if not scales:
        return None
    kw = scales[0]
    vmin, vmax = float(kw["vmin"]), float(kw["vmax"])
    if kind == "depth":
        return Key(f"{name} ({DEPTH_UNIT})", cmap=kw["cmap"], vmin=vmin, vmax=vmax,
                   note="black: invalid")
    if kind in ("saliency", "edge"):
        return Key(f"{name}: probability / label", cmap=kw["cmap"], vmin=vmin, vmax=vmax,
                   note=f"{_colour_name(UNLABELLED)}: unlabelled")
    return Key(name, cmap=kw["cmap"], vmin=vmin, vmax=vmax)


def _colour_name(colour: str) -> str:
    return colour.removeprefix("tab:")


def span_keys(tasks: Mapping[str, Task], rows: Sequence[Sequence[Cell]], first: int,
              per_task: int, card: Mapping | None = None, with_void: bool = True
              ) -> list[tuple[int, int, Key]]:
    """The keys below a grid whose columns from ``first`` on hold ``per_task`` panels per
    task (in ``tasks`` order): ``(first column, span, key)`` for each task that has one."""
    keys = []
    for t, task in enumerate(tasks.values()):
        start = first + t * per_task
        cells = [row[c] for row in rows for c in range(start, start + per_task)]
        key = task_key(task, cells, card, with_void)
        if key is not None:
            keys.append((start, per_task, key))
    return keys


def array_stats(array: np.ndarray) -> tuple[float, float]:
    """(min, max) of the finite values of ``array`` ((0, 1) without any)."""
    finite = np.asarray(array, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
