"""Figures of finished runs: training curves and the qualitative comparison (paper 001, Fig. 4).

Every figure is written as ``<stem>.png`` and ``<stem>.pdf`` with matplotlib's object API
(``matplotlib.figure.Figure``, no pyplot), so nothing here touches the global backend.

``mtpsl figures NAME`` dispatches on :data:`FIGURES`: adding a figure is one function taking a
:class:`FigureRequest` and returning the written paths, plus one :class:`FigureSpec` entry
(e.g. the joint-space feature maps of the ``xtc`` method).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import DataError, MtpslError
from .figures_joint import add_arguments as joint_space_arguments
from .figures_joint import joint_space_figure
from .render import (  # noqa: F401  (re-exported for figure code that colours task maps)
    UNLABELLED,
    Cell,
    colour_normals,
    colour_segmentation,
    voc_colours,
)

if TYPE_CHECKING:  # the module stays light to import: `mtpsl figures` builds its parser here
    import torch
    from matplotlib.figure import Figure

    from .tasks import Task

ARROWS = {True: "↑", False: "↓"}

DPI = 100
CELL_IN = 1.8
"""Width (inches) of one image cell of the qualitative grid."""
TITLE_IN = 0.42
"""Height (inches) above each image cell for its two-line title."""
PANEL_IN = (4.0, 3.0)
"""(width, height) in inches of one panel of the curves figure."""


def _figure(**kwargs) -> Figure:
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def save(fig: Figure, stem: str | Path) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf`` (the figure's own size: no tight cropping)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".pdf")]
    for path in paths:
        fig.savefig(path, dpi=DPI)
    return paths


def default_labels(run_dirs: Sequence[Path]) -> list[str]:
    """Method names if they tell the runs apart, else folder names, else longer path tails."""
    methods = []
    for run in run_dirs:
        final = Path(run) / "final_metrics.json"
        methods.append(json.loads(final.read_text()).get("method") if final.is_file() else None)
    if None not in methods and len(set(methods)) == len(methods):
        return [str(m) for m in methods]
    parts = [Path(r).resolve().parts for r in run_dirs]
    for n in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-n:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(r) for r in run_dirs]


def _check_labels(run_dirs: Sequence, labels: Sequence[str] | None) -> list[str]:
    if labels is None:
        return default_labels([Path(r) for r in run_dirs])
    if len(labels) != len(run_dirs):
        raise MtpslError(f"{len(labels)} labels given for {len(run_dirs)} runs")
    return list(labels)


# -- training curves -------------------------------------------------------------------------

def read_history(run_dir: str | Path) -> list[dict]:
    """The per-epoch rows of a run (``metrics.jsonl``)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path} does not exist (not a run folder?)")
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except ValueError as err:
        raise DataError(f"{path}: not JSON lines ({err})") from None


def _mean_curve(histories: Sequence[list[dict]], key: str):
    """(epochs, mean, std) over the runs that logged ``key`` at each epoch."""
    by_epoch: dict[int, list[float]] = {}
    for rows in histories:
        for row in rows:
            if key in row and row[key] is not None:
                by_epoch.setdefault(int(row["epoch"]), []).append(float(row[key]))
    epochs = sorted(by_epoch)
    mean = np.array([np.mean(by_epoch[e]) for e in epochs])
    std = np.array([np.std(by_epoch[e]) for e in epochs])
    return np.array(epochs), mean, std


def curve_panels(histories: Sequence[list[dict]]) -> list[str]:
    """Keys plotted, one panel each: ``eval/<task>/<primary>`` per task, then ``train/total``."""
    from .report import infer_primary_keys

    keys = dict.fromkeys(k for rows in histories for row in rows for k in row)
    metric_keys = [k.removeprefix("eval/") for k in keys if k.startswith("eval/")]
    panels = [f"eval/{k}" for k in infer_primary_keys(metric_keys)] if metric_keys else []
    return panels + (["train/total"] if "train/total" in keys else [])


def plot_curve_groups(groups: Mapping[str, Sequence[str | Path]], out_stem: str | Path
                      ) -> list[Path]:
    """One panel per primary metric (and the train total loss), one line per group: the mean
    over the group's runs (seeds), shaded +- std when it has several. Where runs carve a
    validation split, its metric (``val/...``) is drawn dashed in the same colour."""
    from matplotlib.ticker import MaxNLocator

    from .report import metric_directions

    if not groups:
        raise MtpslError("no runs to plot")
    histories = {label: [read_history(r) for r in runs] for label, runs in groups.items()}
    panels = curve_panels([h for hs in histories.values() for h in hs])
    if not panels:
        raise DataError("the runs' metrics.jsonl hold no eval/ metric nor train/total loss")
    better = metric_directions([p.removeprefix("eval/") for p in panels if p.startswith("eval/")])
    fig = _figure(figsize=(PANEL_IN[0] * len(panels), PANEL_IN[1]), dpi=DPI,
                 layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, key in zip(axes, panels, strict=True):
        for n, (label, hs) in enumerate(histories.items()):
            colour = f"C{n % 10}"
            epochs, mean, std = _mean_curve(hs, key)
            ax.plot(epochs, mean, marker="o", markersize=3, color=colour, label=label)
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
    axes[0].legend(fontsize=8)
    return save(fig, out_stem)


def plot_curves(run_dirs: Sequence[str | Path], out_stem: str | Path,
                labels: Sequence[str] | None = None) -> list[Path]:
    """Training curves of individual runs, one line each: per task its primary evaluation
    metric over epochs, and the train total loss in its own panel. Returns [png, pdf]."""
    labels = _check_labels(run_dirs, labels)
    if len(set(labels)) != len(labels):
        raise MtpslError(f"labels must differ, got {labels}")
    return plot_curve_groups({lab: [r] for lab, r in zip(labels, run_dirs, strict=True)},
                             out_stem)


# -- qualitative comparison ------------------------------------------------------------------

def plot_seeds(table, out_stem: str | Path) -> list[Path]:
    """Every seed's value of each primary metric (and of the paired Delta_m) per set-up, with
    the mean and its 95% interval beside them: the spread a bar chart would hide.

    ``table`` is a :class:`mtpsl.report.Table`; a row with one seed shows its point alone.
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


@dataclass
class Qualitative:
    """Images, labels and every run's predictions for the chosen evaluation images."""

    labels: list[str]
    tasks: dict[str, Task]
    indices: list[int]
    split: str
    images: np.ndarray
    """float ``[N, H, W, 3]`` in [0, 1]."""
    targets: dict[str, torch.Tensor]
    """Per task, the batch-format labels ``[N, ...]`` on the CPU."""
    preds: list[dict[str, torch.Tensor]]
    """Per run (in ``labels`` order), per task, activated predictions ``[N, ...]`` on the CPU."""
    scores: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    """label -> task -> per-image score (the task's primary metric on that image alone)."""


def image_score(task: Task, pred: torch.Tensor, target: torch.Tensor) -> float:
    """The task's primary metric on one image (``[1, ...]`` tensors), via ``build_metrics``;
    NaN where the image has no valid label pixel."""
    from .evaluate import build_metrics

    metric = build_metrics({task.name: task})[task.name]
    metric.update(pred, target)
    return float(metric.compute()[task.primary_key()])


def collect_qualitative(
    run_dirs: Sequence[str | Path],
    indices: Sequence[int],
    labels: Sequence[str] | None = None,
    split: str | None = None,
    root: str | None = None,
    device: str = "auto",
) -> Qualitative:
    """Load each run with :func:`~mtpsl.inference.load_run`, predict the images ``indices`` of
    ``split`` (default: the first run's evaluation split) of the first run's dataset, and score
    each prediction. All runs must have the same tasks (names, order and definitions)."""
    import torch

    from .data.batch import Collate, PartialLabelSet
    from .experiment import open_dataset, resolve_device
    from .inference import load_run

    if not run_dirs:
        raise MtpslError("no runs given")
    if not indices:
        raise MtpslError("no image indices given")
    labels = _check_labels(run_dirs, labels)
    dev = resolve_device(device)
    runs = [load_run(r, root=root, device=dev) for r in run_dirs]
    tasks = runs[0].tasks
    for label, run in zip(labels[1:], runs[1:], strict=True):
        if run.tasks != tasks:
            raise MtpslError(
                f"run {label!r} has tasks {list(run.tasks.values())}, but {labels[0]!r} has "
                f"{list(tasks.values())}: a qualitative figure needs one task set"
            )
    config = runs[0].config
    split = split or config.dataset.eval_split
    dataset = PartialLabelSet(open_dataset(config, split), tasks)
    bad = [i for i in indices if not 0 <= i < len(dataset)]
    if bad:
        raise MtpslError(f"image indices {bad} out of range: split {split!r} of "
                         f"{config.dataset.root} has {len(dataset)} images")
    batch = Collate(tuple(tasks))([dataset[i] for i in indices])
    preds = []
    with torch.no_grad():
        for run in runs:
            out = run.model(batch.image.to(dev)).preds
            preds.append({name: out[name].detach().float().cpu() for name in tasks})
    images = batch.image.permute(0, 2, 3, 1).clamp(0, 1).numpy()
    data = Qualitative(labels, dict(tasks), list(indices), split, images,
                       dict(batch.targets), preds)
    data.scores = {
        label: {name: [image_score(task, p[name][k:k + 1], batch.targets[name][k:k + 1])
                       for k in range(len(indices))]
                for name, task in tasks.items()}
        for label, p in zip(labels, preds, strict=True)
    }
    return data


def score_table(data: Qualitative) -> list[dict]:
    """The per-image scores the figure is titled with, one row per (image, task, run)."""
    return [
        {"index": idx, "task": name, "metric": task.primary_key(), "run": label,
         "score": data.scores[label][name][k]}
        for k, idx in enumerate(data.indices)
        for name, task in data.tasks.items()
        for label in data.labels
    ]


def _fmt(score: float) -> str:
    return "n/a" if math.isnan(score) else f"{score:.3f}"


def cell_titles(data: Qualitative) -> list[list[str]]:
    """Titles of the grid: one row per image; columns RGB, then per task GT and each run."""
    from .report import metric_directions

    titles = []
    for k, idx in enumerate(data.indices):
        row = [f"{data.split} #{idx}"]
        for name, task in data.tasks.items():
            arrow = ARROWS[metric_directions([f"{name}/{task.primary_key()}"])
                           [f"{name}/{task.primary_key()}"]]
            row.append(f"{name}\nground truth")
            row += [f"{label}\n{task.primary_key()} {arrow} {_fmt(data.scores[label][name][k])}"
                    for label in data.labels]
        titles.append(row)
    return titles




def _panels(data: Qualitative, k: int) -> list[Cell]:
    """(array, imshow kwargs) of every cell of image ``k``'s row."""
    cells: list[Cell] = [(data.images[k], {})]
    for name, task in data.tasks.items():
        cells += task_panels(task, data.targets[name][k], [p[name][k] for p in data.preds])
    return cells


def task_panels(task: Task, target: torch.Tensor, preds: Sequence[torch.Tensor]) -> list[Cell]:
    """The ground-truth cell, then one cell per prediction, of one image and task (unbatched
    batch-format label, activated predictions): the task's own ``panels``."""
    return task.panels(target, preds)


def edge_map(task: Task, pred: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """An edge prediction as the 0/1 map its odsF is taken at (see
    :func:`mtpsl.tasks.binary.edge_map`; imported late: this module stays light)."""
    from .tasks.binary import EdgeTask
    from .tasks.binary import edge_map as edges

    if not isinstance(task, EdgeTask):
        raise MtpslError(f"task {task.name!r} is not an edge task")
    return edges(task, pred, target)


def qualitative_size(data: Qualitative) -> tuple[float, float]:
    """Figure size (inches): columns x CELL_IN wide, rows x (image + title) high."""
    h, w = data.images.shape[1:3]
    cols = 1 + len(data.tasks) * (1 + len(data.labels))
    return cols * CELL_IN, len(data.indices) * (CELL_IN * h / w + TITLE_IN)


def plot_qualitative(data: Qualitative, out_stem: str | Path) -> list[Path]:
    """The grid of paper 001's Fig. 4, one row per image: RGB, then per task the ground truth
    and each run's prediction titled with its per-image score. Segmentation (semantic,
    parts) in a fixed palette (ignore black), depth on one colour scale per image (invalid
    black), normals as RGB; saliency as grey probabilities and 0/1 labels on a fixed [0, 1]
    scale, edges as 0/1 maps (the prediction thresholded where the image's odsF peaks, see
    :func:`edge_map`); unlabelled pixels of binary tasks :data:`UNLABELLED`. Returns
    [png, pdf]."""
    width, _ = qualitative_size(data)
    rows = [_panels(data, k) for k in range(len(data.indices))]
    return plot_panel_grid(rows, cell_titles(data), data.images.shape[1:3], width, out_stem)


def plot_panel_grid(
    rows: Sequence[Sequence[tuple]],
    titles: Sequence[Sequence[str]],
    image_hw: tuple[int, int],
    width: float,
    out_stem: str | Path,
) -> list[Path]:
    """Rows of titled image panels, each CELL_IN wide with the image's aspect; a panel is
    ``(array, imshow_kwargs)``. Shared by every per-image figure. Returns [png, pdf]."""
    h, w = image_hw
    cell_h = CELL_IN * h / w
    height = len(rows) * (cell_h + TITLE_IN)
    fig = _figure(figsize=(width, height), dpi=DPI)
    pad = 0.03 * CELL_IN
    for k, row in enumerate(rows):
        top = height - k * (cell_h + TITLE_IN) - TITLE_IN
        for c, (array, kwargs) in enumerate(row):
            ax = fig.add_axes(((c * CELL_IN + pad) / width, (top - cell_h + pad) / height,
                               (CELL_IN - 2 * pad) / width, (cell_h - 2 * pad) / height))
            ax.imshow(array, aspect="auto", interpolation="nearest", **kwargs)
            ax.set_title(titles[k][c], fontsize=7, pad=2)
            ax.set_axis_off()
    return save(fig, out_stem)


# -- mtpsl figures ---------------------------------------------------------------------------

@dataclass
class FigureRequest:
    """What ``mtpsl figures NAME`` passes to a figure function."""

    runs: list[Path]
    out: Path
    labels: list[str] | None = None
    indices: list[int] = field(default_factory=list)
    split: str | None = None
    root: str | None = None
    device: str = "auto"
    options: dict = field(default_factory=dict)
    """Values of the figure's own arguments (``FigureSpec.add_arguments``)."""


@dataclass(frozen=True)
class FigureSpec:
    make: Callable[[FigureRequest], list[Path]]
    help: str
    uses_images: bool = False
    """The command then requires ``--indices`` and offers ``--split/--root/--device``."""
    add_arguments: Callable | None = None
    """Adds the figure's own command-line options; their values land in ``options``."""


def curves_figure(req: FigureRequest) -> list[Path]:
    return plot_curves(req.runs, req.out / "curves", req.labels)


def seeds_figure(req: FigureRequest) -> list[Path]:
    from .report import build_report

    report = build_report(req.runs, req.options["baseline"])
    return plot_seeds(report["tables"][0], req.out / "seeds")


def seeds_arguments(parser) -> None:
    parser.add_argument("--baseline", default="stl",
                        help="method the paired Δm is measured against (default: stl)")


def qualitative_figure(req: FigureRequest) -> list[Path]:
    data = collect_qualitative(req.runs, req.indices, req.labels, req.split, req.root,
                               req.device)
    return plot_qualitative(data, req.out / "qualitative")


FIGURES: dict[str, FigureSpec] = {
    "curves": FigureSpec(curves_figure, "primary metrics and train loss over epochs per run"),
    "seeds": FigureSpec(
        seeds_figure, "every seed's primary metrics and paired Δm per set-up, with the mean "
        "and its 95% interval (--runs takes run folders or grids, like `mtpsl report`)",
        add_arguments=seeds_arguments),
    "qualitative": FigureSpec(
        qualitative_figure, "RGB, ground truth and each run's predictions with per-image "
        "scores (paper 001, Fig. 4)", uses_images=True),
    "joint-space": FigureSpec(
        joint_space_figure, "an xtc run's mapped joint-space features of a task pair "
        "(--pair, default the run's first two tasks): PCA of both branches and their "
        "per-position cosine (paper 001, Fig. 3)", uses_images=True,
        add_arguments=joint_space_arguments),
}
"""Figures ``mtpsl figures`` offers: name -> spec (the command dispatches on this)."""
