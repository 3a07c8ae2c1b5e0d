"""Training curves: per task its primary evaluation metric over epochs, and the train loss."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mtpsl.analysis.figures.common import (
    ARROWS,
    DPI,
    PANEL_IN,
    FigureRequest,
    _figure,
    check_labels,
    read_history,
    save,
)
from mtpsl.core.errors import DataError, MtpslError


def _mean_curve(histories: Sequence[list[dict]], key: str):
    """(epochs, mean, sample std) over the runs that logged ``key`` at each epoch (std 0
    where one run did)."""
    by_epoch: dict[int, list[float]] = {}
    for rows in histories:
        for row in rows:
            if key in row and row[key] is not None:
                by_epoch.setdefault(int(row["epoch"]), []).append(float(row[key]))
    epochs = sorted(by_epoch)
    mean = np.array([np.mean(by_epoch[e]) for e in epochs])
    std = np.array([np.std(by_epoch[e], ddof=1) if len(by_epoch[e]) > 1 else 0.0
                    for e in epochs])
    return np.array(epochs), mean, std

def curve_panels(histories: Sequence[list[dict]]) -> list[str]:
    """Keys plotted, one panel each: ``eval/<task>/<primary>`` per task, then ``train/total``."""
    from mtpsl.analysis.report import infer_primary_keys

    keys = dict.fromkeys(k for rows in histories for row in rows for k in row)
    metric_keys = [k.removeprefix("eval/") for k in keys if k.startswith("eval/")]
    panels = [f"eval/{k}" for k in infer_primary_keys(metric_keys)] if metric_keys else []
    return panels + (["train/total"] if "train/total" in keys else [])

def plot_curve_groups(groups: Mapping[str, Sequence[str | Path]], out_stem: str | Path
                      ) -> list[Path]:
    """One panel per primary metric (and the train total loss), one line per group: the mean
    over the group's runs (seeds), shaded +- their sample std when it has several (the
    legend and the title say so). Where runs carve a
    validation split, its metric (``val/...``) is drawn dashed in the same colour."""
    from matplotlib.ticker import MaxNLocator

    from mtpsl.analysis.report import metric_directions

    if not groups:
        raise MtpslError("no runs to plot")
    histories = {label: [read_history(r) for r in runs] for label, runs in groups.items()}
    panels = curve_panels([h for hs in histories.values() for h in hs])
    if not panels:
        raise DataError("the runs' metrics.jsonl hold no eval/ metric nor train/total loss")
    better = metric_directions([p.removeprefix("eval/") for p in panels if p.startswith("eval/")])
    columns = legend_columns(len(groups), len(panels))
    below = 0.0 if columns == 0 else 0.2 * math.ceil(len(groups) / columns) + 0.3
    fig = _figure(figsize=(PANEL_IN[0] * len(panels), PANEL_IN[1] + below), dpi=DPI,
                 layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, key in zip(axes, panels, strict=True):
        for n, (label, hs) in enumerate(histories.items()):
            colour, style = line_style(n, len(groups))
            epochs, mean, std = _mean_curve(hs, key)
            ax.plot(epochs, mean, marker="o", markersize=3, color=colour, linestyle=style,
                    label=label)
            if len(hs) > 1:
                ax.fill_between(epochs, mean - std, mean + std, color=colour, alpha=0.2)
            if key.startswith("eval/"):
                val_key = "val/" + key.removeprefix("eval/")
                epochs, mean, _ = _mean_curve(hs, val_key)
                if len(epochs):
                    ax.plot(epochs, mean, linestyle="--", color=colour,
                            label=f"{label} (val split)")
        metric = key.removeprefix("eval/")
        ax.set_title(f"{metric} {ARROWS[better[metric]]}" if metric in better
                     else "train total loss", fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    seeds = sorted({len(hs) for hs in histories.values() if len(hs) > 1})
    if seeds:
        from matplotlib.patches import Patch

        counts = "/".join(str(n) for n in seeds)
        handles.append(Patch(facecolor="0.5", alpha=0.3))
        names.append(f"shaded: ± 1 std over {counts} seeds")
        fig.suptitle(f"lines: mean over each set-up's seeds; shaded band: mean ± 1 sample "
                     f"standard deviation over its {counts} seeds", fontsize=9)
    if columns:  # many set-ups: the legend below the panels, its own rows, not over a panel
        fig.legend(handles, names, fontsize=7, loc="outside lower center", ncols=columns)
    else:
        axes[0].legend(handles, names, fontsize=8)
    return save(fig, out_stem)


LEGEND_INSIDE = 8
"""Up to this many set-ups the legend sits in the first panel; more go below the panels."""


def legend_columns(n_groups: int, n_panels: int) -> int:
    """Columns of the legend below the panels (0: the legend fits inside the first panel)."""
    return 0 if n_groups <= LEGEND_INSIDE else max(2, min(6, 2 * n_panels))


def line_style(n: int, total: int) -> tuple[str | tuple[float, ...], str]:
    """Colour and line style of the ``n``-th of ``total`` lines: matplotlib's 10 colours for
    up to 10, else tab20's 20 cycled with four line styles (80 distinct lines)."""
    if total <= 10:
        return f"C{n}", "-"
    from matplotlib import colormaps

    return colormaps["tab20"](n % 20), ("-", "--", ":", "-.")[(n // 20) % 4]

def plot_curves(run_dirs: Sequence[str | Path], out_stem: str | Path,
                labels: Sequence[str] | None = None) -> list[Path]:
    """Training curves of individual runs, one line each: per task its primary evaluation
    metric over epochs, and the train total loss in its own panel. Returns [png, pdf]."""
    labels = check_labels(run_dirs, labels)
    if len(set(labels)) != len(labels):
        raise MtpslError(f"labels must differ, got {labels}")
    return plot_curve_groups({lab: [r] for lab, r in zip(labels, run_dirs, strict=True)},
                             out_stem)

def curves_figure(req: FigureRequest) -> list[Path]:
    return plot_curves(req.runs, req.out / "curves", req.labels)
