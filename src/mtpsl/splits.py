"""Partial-label regimes: which tasks are labelled for which training image.

A split is a boolean matrix ``labelled[N, T]`` (image x task, task order = the dataset's).
Regimes are registered functions ``(n_images, n_tasks, rng, **params) -> bool[N, T]``; a split
is seeded, saved as JSON with every run, and can be loaded back from our JSON or from the
reference implementation's ``{'labels_weights': FloatTensor[N, T]}`` ``.pth`` files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .registry import Registry

REGIMES: Registry = Registry("label regime")
FORMAT = "mtpsl-split/1"


@REGIMES.register("full")
def full(n: int, t: int, rng: np.random.Generator) -> np.ndarray:
    """Every task labelled on every image (the fully supervised setting)."""
    return np.ones((n, t), dtype=bool)


@REGIMES.register("onelabel")
def onelabel(n: int, t: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly one task per image, balanced: per-task counts differ by at most one."""
    return _one_task_per_image(n, t, rng, counts=_balanced_counts(n, t))


@REGIMES.register("random")
def random_subset(n: int, t: int, rng: np.random.Generator) -> np.ndarray:
    """Each image gets k ~ U{1..T-1} tasks, chosen uniformly (never none, never all)."""
    if t < 2:
        raise ValueError("the 'random' regime needs at least 2 tasks")
    labelled = np.zeros((n, t), dtype=bool)
    sizes = rng.integers(1, t, size=n)  # upper bound exclusive: 1..T-1
    for i, k in enumerate(sizes):
        labelled[i, rng.choice(t, size=k, replace=False)] = True
    return labelled


@REGIMES.register("ratio")
def ratio(n: int, t: int, rng: np.random.Generator, *, ratios: Sequence[float]) -> np.ndarray:
    """One task per image with imbalanced proportions, e.g. seg:depth = 9:1 (paper 001 4.2).

    ``ratios`` are relative weights in task order; counts are rounded by largest remainder so
    they sum to N exactly.
    """
    weights = np.asarray(ratios, dtype=float)
    if weights.shape != (t,) or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"ratios must be {t} non-negative weights (one per task), got {ratios}")
    exact = weights / weights.sum() * n
    counts = np.floor(exact).astype(int)
    remainder_order = np.argsort(-(exact - counts), kind="stable")
    counts[remainder_order[: n - counts.sum()]] += 1
    return _one_task_per_image(n, t, rng, counts=counts)


def _balanced_counts(n: int, t: int) -> np.ndarray:
    counts = np.full(t, n // t)
    counts[: n % t] += 1
    return counts


def _one_task_per_image(n: int, t: int, rng: np.random.Generator, counts: np.ndarray):
    task_of_slot = np.repeat(np.arange(t), counts)
    labelled = np.zeros((n, t), dtype=bool)
    labelled[rng.permutation(n), task_of_slot] = True
    return labelled


@dataclass
class Split:
    """A partial-label assignment for one training set."""

    labelled: np.ndarray
    task_names: tuple[str, ...]
    regime: str = "custom"
    seed: int | None = None
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labelled = np.asarray(self.labelled, dtype=bool)
        self.task_names = tuple(self.task_names)
        if self.labelled.ndim != 2 or self.labelled.shape[1] != len(self.task_names):
            raise ValueError(
                f"labelled must be [N, {len(self.task_names)}] for tasks {self.task_names}, "
                f"got shape {self.labelled.shape}"
            )

    def __len__(self) -> int:
        return self.labelled.shape[0]

    def counts(self) -> dict[str, int]:
        """Labelled images per task."""
        return {t: int(c) for t, c in zip(self.task_names, self.labelled.sum(0), strict=True)}

    def summary(self) -> str:
        per_task = ", ".join(f"{t}={c}" for t, c in self.counts().items())
        sizes = np.bincount(self.labelled.sum(1), minlength=len(self.task_names) + 1)
        per_size = ", ".join(f"{k} tasks: {c}" for k, c in enumerate(sizes) if c)
        return f"{self.regime} split of {len(self)} images; per task {per_task}; {per_size}"

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "regime": self.regime,
            "seed": self.seed,
            "params": self.params,
            "tasks": list(self.task_names),
            "labelled": self.labelled.astype(int).tolist(),
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path, task_names: Sequence[str] | None = None) -> Split:
        """Load our JSON or a reference ``.pth``; check it against the dataset's tasks."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"split file {path} does not exist")
        split = _load_pth(path, task_names) if path.suffix == ".pth" else _load_json(path)
        if task_names is not None and tuple(task_names) != split.task_names:
            raise DataError(
                f"split file {path} is for tasks {list(split.task_names)}, "
                f"but the dataset has {list(task_names)}"
            )
        return split


def _load_json(path: Path) -> Split:
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise TypeError(f"the top level is a {type(data).__name__}, not an object")
        if data.get("format") != FORMAT:
            raise ValueError(f"'format' is {data.get('format')!r}, expected {FORMAT!r}")
        return Split(
            labelled=np.asarray(data["labelled"], dtype=bool),
            task_names=data["tasks"],
            regime=data.get("regime", "custom"),
            seed=data.get("seed"),
            params=data.get("params", {}),
        )
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as err:
        raise DataError(f"split file {path} is not a valid mtpsl split: {err}") from None


def _load_pth(path: Path, task_names: Sequence[str] | None) -> Split:
    """The reference format; read with weights_only=True so no pickled code can run."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        weights = data["labels_weights"]
    except Exception as err:  # torch raises many types for corrupt or unsafe files
        raise DataError(
            f"split file {path} is not a reference split "
            f"({{'labels_weights': FloatTensor[N, T]}}): {err}"
        ) from None
    try:  # anything tensor-like; bfloat16, sparse, grad-tracking... tensors and others refuse
        matrix = np.asarray(torch.as_tensor(weights).detach().to_dense().numpy())
    except Exception as err:
        raise DataError(
            f"split file {path}: labels_weights is not a numeric matrix: {err}"
        ) from None
    if matrix.ndim != 2 or not np.isin(matrix, (0, 1)).all():
        raise DataError(f"split file {path}: labels_weights must be a 0/1 matrix [N, T]")
    names = tuple(task_names) if task_names else tuple(f"task{i}" for i in range(matrix.shape[1]))
    if len(names) != matrix.shape[1]:
        raise DataError(
            f"split file {path} has {matrix.shape[1]} task columns, the dataset has {list(names)}"
        )
    return Split(labelled=matrix.astype(bool), task_names=names, regime=f"file:{path.name}")


def make_split(
    regime: str, n_images: int, task_names: Sequence[str], seed: int, **params
) -> Split:
    """Draw a split from a registered regime with its own seeded generator."""
    rng = np.random.default_rng(seed)
    labelled = REGIMES.get(regime)(n_images, len(task_names), rng, **params)
    return Split(labelled, tuple(task_names), regime=regime, seed=seed, params=dict(params))
