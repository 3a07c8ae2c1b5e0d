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


def plot_seeds(table: Table, out_stem: str | Path) -> list[Path]:
    """Every seed's value of each primary metric (and of the paired Delta_m) per set-up, with
    the mean and its 95% interval beside them: the spread a bar chart would hide.

    ``table`` is a :class:`mtpsl.analysis.report.Table`; a row with one seed shows its point alone.
    """
    rows = table.rows
    keys = list(table.primary) + (["delta_m"] if any("_delta_points" in r for r in rows) else [])
    if not rows or not keys:
        return []
    fig = _figure(figsize=(PANEL_IN[0] * len(keys), PANEL_IN[1] + 0.8), layout="constrained")
    names = [f"{r['setup']} · {r['method']}" if r["setup"] else r["method"] for r in rows]
    for n, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), n + 1)
        for x, row in enumerate(rows):
            points = row.get("_delta_points") if key == "delta_m" else row["_points"].get(key)
            if points:
                _seed_points(ax, x, list(points.values()), row, key)
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=7)
        if key == "delta_m":
            ax.axhline(0.0, color="0.5", lw=0.8, ls="--")
            ax.set_title("Δm % (paired, vs baseline) ↑", fontsize=9)
        else:
            ax.set_title(f"{key} {ARROWS[table.better[key]]}", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle("each seed (dots), mean and 95% interval (black)", fontsize=8)
    return save(fig, out_stem)

def _seed_points(ax, x: int, values: Sequence[float], row: Mapping, key: str) -> None:
    offsets = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else np.zeros(1)
    ax.scatter(x - 0.1 + offsets, values, s=14, alpha=0.75, color=f"C{x % 10}", lw=0)
    mean = row[key]
    if f"{key}:ci_low" in row:
        err = [[mean - row[f"{key}:ci_low"]], [row[f"{key}:ci_high"] - mean]]
        ax.errorbar(x + 0.2, mean, yerr=err, fmt="o", color="black", ms=3.5, capsize=3,
                    lw=1.0)
    else:
        ax.plot(x + 0.2, mean, "o", color="black", ms=3.5)

def seeds_figure(req: FigureRequest) -> list[Path]:
    from mtpsl.analysis.report import build_report

    report = build_report(req.runs, req.options["baseline"])
    return plot_seeds(report["tables"][0], req.out / "seeds")

def seeds_arguments(parser) -> None:
    parser.add_argument("--baseline", default="stl",
                        help="method the paired Δm is measured against (default: stl)")
