"""Every seed's value per set-up, beside the mean and its 95% interval: the spread a bar chart
would hide."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mtpsl.analysis.figures.common import ARROWS, PANEL_IN, FigureRequest, _figure, save

if TYPE_CHECKING:
    from mtpsl.analysis.report import Table


ROW_IN = 0.3
"""Height (inches) of one set-up's line: the figure grows with the rows, so labels never
overlap however many set-ups a report holds."""
LABEL_PT = 8.0
NAME_CHARS = 48
"""Longest set-up name shown in full; longer ones are cut in the middle (the tables keep
the whole name)."""


def short_name(name: str, limit: int = NAME_CHARS) -> str:
    """``name`` cut in the middle to at most ``limit`` characters."""
    if len(name) <= limit:
        return name
    head = (limit - 1) // 2
    return f"{name[:head]}…{name[len(name) - (limit - 1 - head):]}"


def seeds_size(n_rows: int, n_keys: int, longest: int) -> tuple[float, float]:
    """(width, height) in inches: a panel per metric beside the set-up names, one line per
    set-up."""
    names_in = min(longest, NAME_CHARS) * 0.6 * LABEL_PT / 72 + 0.3
    return names_in + PANEL_IN[0] * n_keys, 1.2 + ROW_IN * max(n_rows, 2)


def plot_seeds(table: Table, out_stem: str | Path) -> list[Path]:
    """Every seed's value of each primary metric (and of the paired Delta_m) per set-up, with
    the mean and its 95% interval beside them: the spread a bar chart would hide. One line
    per set-up (named on the left, the baseline's first), one panel per metric; the figure
    grows with the set-ups.

    ``table`` is a :class:`mtpsl.analysis.report.Table`; a row with one seed shows its point alone.
    """
    rows = table.rows
    keys = list(table.primary) + (["delta_m"] if any("_delta_points" in r for r in rows) else [])
    if not rows or not keys:
        return []
    names = [short_name(f"{r['setup']} · {r['method']}" if r["setup"] else r["method"])
             for r in rows]
    fig = _figure(figsize=seeds_size(len(rows), len(keys), max(map(len, names))),
                  layout="constrained")
    axes = fig.subplots(1, len(keys), sharey=True, squeeze=False)[0]
    for n, (ax, key) in enumerate(zip(axes, keys, strict=True)):
        for y, row in enumerate(rows):
            points = row.get("_delta_points") if key == "delta_m" else row["_points"].get(key)
            if points:
                _seed_points(ax, y, list(points.values()), row, key)
        ax.tick_params(axis="y", labelleft=n == 0, labelsize=LABEL_PT)
        if key == "delta_m":
            ax.axvline(0.0, color="0.5", lw=0.8, ls="--")
            ax.set_title("Δm % (paired, vs baseline) ↑", fontsize=9)
        else:
            ax.set_title(f"{key} {ARROWS[table.better[key]]}", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(rows)), names)
    axes[0].set_ylim(len(rows) - 0.5, -0.5)  # first row on top
    fig.suptitle("each seed (coloured dots); mean and 95% interval (black)", fontsize=9)
    return save(fig, out_stem)

def _seed_points(ax, y: int, values: Sequence[float], row: Mapping, key: str) -> None:
    offsets = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(1)
    ax.scatter(values, y - 0.12 + offsets, s=14, alpha=0.75, color=f"C{y % 10}", lw=0)
    mean = row[key]
    if f"{key}:ci_low" in row:
        err = [[mean - row[f"{key}:ci_low"]], [row[f"{key}:ci_high"] - mean]]
        ax.errorbar(mean, y + 0.18, xerr=err, fmt="o", color="black", ms=3.5, capsize=3,
                    lw=1.0)
    else:
        ax.plot(mean, y + 0.18, "o", color="black", ms=3.5)

def seeds_figure(req: FigureRequest) -> list[Path]:
    from mtpsl.analysis.report import build_report

    report = build_report(req.runs, req.options["baseline"])
    return plot_seeds(report["tables"][0], req.out / "seeds")

def seeds_arguments(parser) -> None:
    parser.add_argument("--baseline", default="stl",
                        help="method the paired Δm is measured against (default: stl)")
