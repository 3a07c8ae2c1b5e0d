"""The joint task-space of a trained ``xtc`` run (paper 001, Fig. 3), of its variants, or of a
``jtr`` run (the method's ``joint_space``: which maps its loss compares).

For a task pair (s, t) and each chosen evaluation image, one row: the RGB image, the
prediction of s, the ground truth of t, then the two branches the consistency loss compares,
``m^{s->st}(y_hat^s)`` and ``m^{t->st}(y^t)`` (the mapping network conditioned on the ordered
pair (s, t), as in training; for ``jtr``, the auto-encoder's latents of all stacked
predictions and of all stacked labels), shown as

* the first three principal components of their channels rendered as RGB; the PCA is fitted
  jointly on both maps of the image, so equal colours mean nearby joint-space features;
* the per-position cosine similarity of the two maps, titled with its mean (the figure's
  number is ``1 -`` the image's cosine distance term of Eq. 4, without the regulariser).

Deterministic by design: the run's model is in eval mode (BatchNorm running statistics; the
mapping network normalises per sample either way), and a segmentation prediction enters the
mapping as the one-hot of its argmax, where training draws a hard Gumbel-softmax sample. The
argmax is the Gumbel sample's noise-free mode, so the figure does not change from run to run.

Written as ``joint-space.png`` / ``.pdf`` (one run) or ``joint-space-<label>.*`` (several).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mtpsl.analysis.figures.common import CELL_IN, FigureRequest, check_labels, plot_panel_grid
from mtpsl.core.errors import MtpslError
from mtpsl.core.palette import COSINE_CMAP

if TYPE_CHECKING:
    import torch

    from mtpsl.tasks import Task

STEM = "joint-space"
COLUMNS = 6
"""RGB, source prediction, target ground truth, PCA of m_s, PCA of m_t, cosine map."""


def parse_pair(pair: str | Sequence[str] | None, tasks: Sequence[str]) -> tuple[str, str]:
    """``"semantic,depth"`` (or a 2-sequence) -> ``(source, target)``; ``None`` -> the first
    two tasks. Raises MtpslError listing the run's tasks for anything else."""
    names = list(tasks)
    if pair is None:
        if len(names) < 2:
            raise MtpslError(f"the run has tasks {names}: a joint space needs two")
        return names[0], names[1]
    parts = [p.strip() for p in pair.split(",")] if isinstance(pair, str) else list(pair)
    if len(parts) != 2 or not all(parts):
        raise MtpslError(f"pair {pair!r}: give two task names 'SOURCE,TARGET' "
                         f"(tasks: {', '.join(names)})")
    unknown = [p for p in parts if p not in names]
    if unknown:
        raise MtpslError(f"pair {pair!r}: unknown task {unknown[0]!r}; the run's tasks are "
                         f"{', '.join(names)}")
    if parts[0] == parts[1]:
        raise MtpslError(f"pair {pair!r}: the two tasks must differ "
                         f"(tasks: {', '.join(names)})")
    return parts[0], parts[1]


def cosine_map(m_s: torch.Tensor, m_t: torch.Tensor) -> torch.Tensor:
    """Per-position cosine over channels, ``[N, C, h, w]`` x2 -> ``[N, h, w]`` (the eps of the
    xtc loss, so ``1 - cosine_map(...).mean((1, 2))`` is its pair term)."""
    import torch.nn.functional as F

    return F.cosine_similarity(m_s, m_t, dim=1, eps=1e-8)


def mean_cosine(m_s: torch.Tensor, m_t: torch.Tensor) -> list[float]:
    """The per-image mean of :func:`cosine_map`: the numbers the figure is titled with."""
    return [float(v) for v in cosine_map(m_s, m_t).flatten(1).mean(dim=1)]


def joint_pca(a: np.ndarray, b: np.ndarray, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` principal components of two ``[C, h, w]`` maps, fitted on the positions
    of both together; each component min-max scaled to [0, 1] over both maps, so the two
    results share one colour scale. Returns two ``[h, w, k]`` arrays (missing components,
    when the maps have rank < k, are 0). Signs are fixed: each component's largest loading is
    positive."""
    c, h, w = a.shape
    x = np.concatenate([a.reshape(c, -1).T, b.reshape(c, -1).T]).astype(np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    comps = np.zeros((c, k))
    n = min(k, vt.shape[0], int((s > 1e-9 * max(s.max(initial=0.0), 1e-30)).sum()))
    for j in range(n):
        v = vt[j]
        comps[:, j] = v if v[np.argmax(np.abs(v))] >= 0 else -v
    proj = x @ comps  # [2hw, k]
    lo, hi = proj.min(axis=0), proj.max(axis=0)
    proj = np.where(hi > lo, (proj - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0)
    return proj[: h * w].reshape(h, w, k), proj[h * w:].reshape(h, w, k)


@dataclass
class JointSpace:
    """One run's mapped joint-space features of a task pair for the chosen images."""

    run: Path
    tasks: dict[str, Task]
    source: str
    target: str
    pair_id: int
    """The FiLM id of the ordered pair (``pair_index(s, t, K)``)."""
    indices: list[int]
    split: str
    images: np.ndarray
    """float ``[N, H, W, 3]`` in [0, 1]."""
    source_pred: torch.Tensor
    """Activated predictions of the source task ``[N, ...]`` (CPU)."""
    target_label: torch.Tensor
    """Ground truth of the target task ``[N, ...]`` (CPU, batch format)."""
    mapped_source: torch.Tensor
    """``m^{s->st}(y_hat^s)``: ``[N, C, h, w]`` (CPU)."""
    mapped_target: torch.Tensor
    """``m^{t->st}(y^t)``: ``[N, C, h, w]`` (CPU)."""
    titles: tuple[str, str] = ("m s->(s,t)", "m t->(s,t)")
    """What the two mapped maps are (the method says)."""
    card: dict | None = None
    """The run's model card: class names and colours of the keys."""

    @property
    def cosine(self) -> torch.Tensor:
        return cosine_map(self.mapped_source, self.mapped_target)

    @property
    def mean_cosine(self) -> list[float]:
        return mean_cosine(self.mapped_source, self.mapped_target)


def collect_joint_space(
    run_dir: str | Path,
    pair: str | Sequence[str] | None,
    indices: Sequence[int],
    split: str | None = None,
    root: str | None = None,
    device: str = "auto",
) -> JointSpace:
    """Load an ``xtc`` run with its trained mapping network, predict the images ``indices`` of
    ``split`` (default: the run's evaluation split) and map the source prediction and the
    target label into the joint space of the pair."""
    import torch

    from mtpsl.data.batch import Collate, PartialLabelSet
    from mtpsl.engine.build import open_dataset, resolve_device
    from mtpsl.inference.load import load_method, load_run
    from mtpsl.methods.joint_space import pair_index

    if not indices:
        raise MtpslError("no image indices given")
    dev = resolve_device(device)
    run = load_run(run_dir, root=root, device=dev)
    method = load_method(run)
    names = list(run.tasks)
    source, target = parse_pair(pair, names)
    split = split or run.config.dataset.eval_split
    dataset = PartialLabelSet(open_dataset(run.config, split), run.tasks)
    bad = [i for i in indices if not 0 <= i < len(dataset)]
    if bad:
        raise MtpslError(f"image indices {bad} out of range: split {split!r} of "
                         f"{run.config.dataset.root} has {len(dataset)} images")
    batch = Collate(tuple(run.tasks))([dataset[i] for i in indices])
    pid = pair_index(names.index(source), names.index(target), len(names))
    with torch.no_grad():
        preds = run.model(batch.image.to(dev)).preds
        targets = {k: v.to(dev) for k, v in batch.targets.items()}
        maps = method.joint_space(preds, targets, source, target)
    if maps is None:
        raise MtpslError(f"run {run_dir} was trained with method {run.config.method.name!r}, "
                         f"which has no joint task space to draw (xtc, its variants and jtr "
                         f"have)")
    m_s, m_t, titles = maps
    return JointSpace(
        Path(run_dir), dict(run.tasks), source, target, pid, list(indices), split,
        batch.image.permute(0, 2, 3, 1).clamp(0, 1).numpy(), preds[source].float().cpu(),
        batch.targets[target].cpu(), m_s.float().cpu(), m_t.float().cpu(), titles, run.card)


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def joint_space_titles(data: JointSpace) -> list[list[str]]:
    """Titles of the grid, one row per image (the last cell carries the mean cosine)."""
    s, t = data.source, data.target
    return [
        [f"{data.split} #{idx}", f"{s}\nprediction", f"{t}\nground truth",
         f"{data.titles[0]}\nPCA (shared)", f"{data.titles[1]}\nPCA (shared)",
         f"cosine per position\nmean {_fmt(mean)}"]
        for idx, mean in zip(data.indices, data.mean_cosine, strict=True)
    ]


def _task_cell(task: Task, array: torch.Tensor, is_label: bool) -> tuple[np.ndarray, dict]:
    """Display of the source prediction / target label, by the task's own ``panels``. A
    binary prediction (saliency, edges) is shown as its probability map, which is what
    enters the mapping network."""
    return task.panels(array, [])[0] if is_label else task.panels(None, [array])[0]


def _cells(data: JointSpace, k: int) -> list[tuple[np.ndarray, dict]]:
    pca_s, pca_t = joint_pca(data.mapped_source[k].numpy(), data.mapped_target[k].numpy())
    return [
        (data.images[k], {}),
        _task_cell(data.tasks[data.source], data.source_pred[k], False),
        _task_cell(data.tasks[data.target], data.target_label[k], True),
        (pca_s, {}),
        (pca_t, {}),
        (data.cosine[k].numpy(), {"cmap": COSINE_CMAP, "vmin": 0.0, "vmax": 1.0}),
    ]


def joint_space_keys(data: JointSpace, rows: Sequence[Sequence[tuple]]) -> list:
    """The keys below the grid: the source prediction's and the target label's (as in the
    qualitative figure), what the PCA colours are, and the cosine's colour bar."""
    from matplotlib import colormaps

    from mtpsl.core.render import Key
    from mtpsl.inference.panels import task_key

    keys = []
    for col, name, is_label in ((1, data.source, False), (2, data.target, True)):
        key = task_key(data.tasks[name], [row[col] for row in rows], data.card,
                       with_void=is_label)
        if key is not None:
            keys.append((col, 1, key))
    keys.append((3, 2, Key("PCA colours: the first three principal components of both maps' "
                           "channels as RGB, fitted jointly, so equal colours are nearby "
                           "joint-space features")))
    keys.append((5, 1, Key("cosine (no unit)", cmap=colormaps[COSINE_CMAP], vmin=0.0,
                           vmax=1.0)))
    return keys


def plot_joint_space(data: JointSpace, out_stem: str | Path) -> list[Path]:
    """The grid: one row per image, :data:`COLUMNS` cells (see the module docstring), the
    joint-space maps (1/32 resolution) stretched to the image's cell, and keys below (the
    two tasks' colours, the PCA's meaning, the cosine's colour bar). Cosine on a fixed [0, 1]
    scale (the mapped features are ReLU outputs, so it cannot be negative). Returns
    [png, pdf]."""
    from mtpsl.core.render import unify_scales

    rows = [_cells(data, k) for k in range(len(data.indices))]
    for col in (1, 2):
        unify_scales(rows, [col])
    return plot_panel_grid(rows, joint_space_titles(data), data.images.shape[1:3],
                           COLUMNS * CELL_IN, out_stem, joint_space_keys(data, rows))


def add_arguments(parser) -> None:
    """The figure's own option; it reaches :func:`joint_space_figure` as ``options["pair"]``."""
    parser.add_argument("--pair", metavar="SOURCE,TARGET",
                        help="ordered task pair (default: the run's first two tasks)")


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "run"


def joint_space_figure(req: FigureRequest, pair: str | Sequence[str] | None = None
                       ) -> list[Path]:
    """``mtpsl figures joint-space``: one figure per run. The pair comes from ``pair``, else
    from ``--pair`` (``req.options``), else the run's first two tasks."""
    if pair is None:
        pair = req.options.get("pair")
    labels = [_safe(x) for x in check_labels(req.runs, req.labels)]
    if len(set(labels)) < len(labels):
        labels = [str(n) for n in range(len(labels))]
    stems = [STEM] if len(req.runs) == 1 else [f"{STEM}-{x}" for x in labels]
    paths = []
    for run, stem in zip(req.runs, stems, strict=True):
        data = collect_joint_space(run, pair, req.indices, req.split, req.root, req.device)
        paths += plot_joint_space(data, req.out / stem)
    return paths
