"""The qualitative comparison (paper 001, Fig. 4): RGB, ground truth and each run's prediction
of chosen evaluation images, each titled with its per-image score."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mtpsl.analysis.figures.common import (
    ARROWS,
    CELL_IN,
    FigureRequest,
    check_labels,
    grid_height,
    plot_panel_grid,
)
from mtpsl.core.errors import MtpslError
from mtpsl.core.render import Cell

if TYPE_CHECKING:
    import torch

    from mtpsl.tasks import Task


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
    card: dict | None = None
    """The first run's model card: class names and colours of the keys."""

def image_score(task: Task, pred: torch.Tensor, target: torch.Tensor) -> float:
    """The task's primary metric on one image (``[1, ...]`` tensors), via ``build_metrics``;
    NaN where the image has no valid label pixel."""
    from mtpsl.tasks.scoring import build_metrics

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
    """Load each run with :func:`~mtpsl.inference.load.load_run`, predict the images ``indices`` of
    ``split`` (default: the first run's evaluation split) of the first run's dataset, and score
    each prediction. All runs must have the same tasks (names, order and definitions)."""
    import torch

    from mtpsl.data.batch import Collate, PartialLabelSet
    from mtpsl.engine.build import open_dataset, resolve_device
    from mtpsl.inference.load import load_run

    if not run_dirs:
        raise MtpslError("no runs given")
    if not indices:
        raise MtpslError("no image indices given")
    labels = check_labels(run_dirs, labels)
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
                       dict(batch.targets), preds, card=runs[0].card)
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
    from mtpsl.analysis.report import metric_directions

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
        cells += task.panels(data.targets[name][k], [p[name][k] for p in data.preds])
    return cells


def _grid(data: Qualitative) -> tuple[list[list[Cell]], list]:
    """The rows of cells (each task's panels on one scale over all rows) and the keys below
    them, one per task spanning its ground truth and predictions."""
    from mtpsl.core.render import unify_scales
    from mtpsl.inference.panels import span_keys

    rows = [_panels(data, k) for k in range(len(data.indices))]
    per_task = 1 + len(data.labels)
    for t in range(len(data.tasks)):
        unify_scales(rows, range(1 + t * per_task, 1 + (t + 1) * per_task))
    return rows, span_keys(data.tasks, rows, 1, per_task, data.card)


def qualitative_size(data: Qualitative) -> tuple[float, float]:
    """Figure size (inches): columns x CELL_IN wide; rows x (image + title) high, plus the
    row of keys below them."""
    cols = 1 + len(data.tasks) * (1 + len(data.labels))
    return cols * CELL_IN, grid_height(len(data.indices), data.images.shape[1:3],
                                       _grid(data)[1])


def plot_qualitative(data: Qualitative, out_stem: str | Path) -> list[Path]:
    """The grid of paper 001's Fig. 4, one row per image: RGB, then per task the ground truth
    and each run's prediction titled with its per-image score; below each task a key (class
    names and colours, a depth colour bar in metres, the normals' colour disc, the [0, 1]
    scale of probabilities). Colours are :mod:`mtpsl.core.palette`'s: segmentation (semantic,
    parts) in the run's class colours (void black), depth in viridis on one scale over the
    figure (invalid black), normals as RGB ``(n + 1) / 2``; saliency as grey probabilities
    and 0/1 labels on a fixed [0, 1] scale, edges as 0/1 maps (the prediction thresholded
    where the image's odsF peaks, see :func:`mtpsl.tasks.binary.edge_map`); unlabelled
    pixels of binary tasks :data:`~mtpsl.core.palette.UNLABELLED`. Returns [png, pdf]."""
    width = (1 + len(data.tasks) * (1 + len(data.labels))) * CELL_IN
    rows, keys = _grid(data)
    return plot_panel_grid(rows, cell_titles(data), data.images.shape[1:3], width, out_stem,
                           keys)


def qualitative_figure(req: FigureRequest) -> list[Path]:
    data = collect_qualitative(req.runs, req.indices, req.labels, req.split, req.root,
                               req.device)
    return plot_qualitative(data, req.out / "qualitative")
