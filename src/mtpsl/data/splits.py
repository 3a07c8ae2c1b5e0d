"""Partial-label regimes: which tasks are labelled for which training image.

A split is a boolean matrix ``labelled[N, T]`` (image x task, task order = the dataset's).
Regimes are registered functions ``(n_images, n_tasks, rng, **params) -> bool[N, T]``; a split
is seeded, saved as JSON with every run, and can be loaded back from our JSON, from the
reference implementation's ``{'labels_weights': FloatTensor[N, T]}`` ``.pth`` files, or from
the PASCAL-Context format: a mapping task -> list of labelled image ids (``.json``, or a
pickled ``.npy`` read with a restricted unpickler).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from mtpsl.core.errors import DataError
from mtpsl.core.files import write_text
from mtpsl.core.registry import Registry

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

    def counts(
        self, available: np.ndarray | None = None, rows: np.ndarray | None = None
    ) -> dict[str, int]:
        """Labelled images per task: by the regime alone, or (``available``: bool ``[N, T]``,
        which labels exist in the data) the labels training can actually see.

        ``rows`` (a bool mask or indices) restricts the count to some images, e.g. a source.
        """
        labelled = self.labelled if available is None else self.labelled & available
        if rows is not None:
            labelled = labelled[rows]
        return {t: int(c) for t, c in zip(self.task_names, labelled.sum(0), strict=True)}

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

    def digest(self) -> str:
        """SHA-256 of the split's content (tasks, regime, seed, every label bit)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def save(self, path: str | Path) -> None:
        write_text(path, json.dumps(self.to_dict()))

    @classmethod
    def load(
        cls,
        path: str | Path,
        task_names: Sequence[str] | None = None,
        image_ids: Sequence[str] | None = None,
    ) -> Split:
        """Load our JSON, a reference ``.pth`` or a task -> image-id mapping (``.json`` or
        ``.npy``; needs the dataset's ``image_ids``); check it against the dataset's tasks.

        Values other than 0/1 (or false/true) and a split that labels nothing are refused: a
        2 or -1 is not "labelled", and an empty split trains on nothing with every loss 0."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"split file {path} does not exist")
        if path.suffix == ".pth":
            split = _load_pth(path, task_names)
        elif path.suffix == ".npy":
            split = _from_id_lists(path, _load_pickled_npy(path), task_names, image_ids)
        else:
            data = _read_json(path)
            if _is_id_lists(data):
                split = _from_id_lists(path, data, task_names, image_ids)
            else:
                split = _load_json(path, data)
        if task_names is not None and tuple(task_names) != split.task_names:
            raise DataError(
                f"split file {path} is for tasks {list(split.task_names)}, "
                f"but the dataset has {list(task_names)}"
            )
        if not split.labelled.any():
            raise DataError(f"split file {path} labels no task on any of its {len(split)} "
                            "images: there would be nothing to train on (every loss 0)")
        return split


def _is_id_lists(data: object) -> bool:
    """A non-empty mapping of lists without our ``format`` key: the task -> ids format."""
    return (isinstance(data, dict) and bool(data) and "format" not in data
            and all(isinstance(v, list) for v in data.values()))


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (ValueError, RecursionError, OSError) as err:
        raise DataError(f"split file {path} is not a valid mtpsl split: {err}") from None


def _load_json(path: Path, data: object) -> Split:
    try:
        if not isinstance(data, dict):
            raise TypeError(f"the top level is a {type(data).__name__}, not an object")
        if data.get("format") != FORMAT:
            raise ValueError(f"'format' is {data.get('format')!r}, expected {FORMAT!r}")
        return Split(
            labelled=_zero_one(data["labelled"]),
            task_names=data["tasks"],
            regime=data.get("regime", "custom"),
            seed=data.get("seed"),
            params=data.get("params", {}),
        )
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as err:
        raise DataError(f"split file {path} is not a valid mtpsl split: {err}") from None


def _zero_one(values: object) -> np.ndarray:
    """A 0/1 (or false/true) matrix as bool; any other value (2, -1, 0.5, "yes") is refused
    rather than read as true."""
    array = np.asarray(values)
    if array.dtype.kind not in "biuf" or not np.isin(array, (0, 1)).all():
        raise ValueError("'labelled' must hold only 0/1 (or false/true)")
    return array.astype(bool)


def _load_pth(path: Path, task_names: Sequence[str] | None) -> Split:
    """The reference format; read with weights_only=True so no pickled code can run."""
    try:
        import torch  # only here: config validation imports this module and must stay light

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


class _IdListUnpickler(pickle.Unpickler):
    """Unpickles only what ``np.save`` writes for a dict of lists of strings: numpy's array
    reconstruction (an object array holds the dict) and plain containers. Anything else (a
    pickled function or class that would run code) is refused."""

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset({
        ("builtins", "dict"), ("builtins", "list"), ("builtins", "str"), ("builtins", "int"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    })

    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def _load_pickled_npy(path: Path) -> object:
    """A pickled ``.npy`` (``np.save`` of a dict) read with :class:`_IdListUnpickler`."""
    try:
        with open(path, "rb") as fp:
            version = np.lib.format.read_magic(fp)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            _shape, _fortran, dtype = read_header(fp)
            if not dtype.hasobject:
                raise ValueError(f"holds a plain {dtype} array, not a pickled mapping")
            data = _IdListUnpickler(io.BytesIO(fp.read())).load()
    except Exception as err:  # corrupt headers and refused or broken pickles alike
        raise DataError(
            f"split file {path} is not a pickled task -> image-id mapping: {err}"
        ) from None
    if isinstance(data, np.ndarray) and data.dtype.hasobject and data.ndim == 0:
        data = data.item()
    return data


def _from_id_lists(
    path: Path, data: object, task_names: Sequence[str] | None, image_ids: Sequence[str] | None
) -> Split:
    """Rows = the dataset's images, columns = its tasks; a cell is set when the image's id is
    listed under the task (the benchmark's task names are accepted too)."""
    from mtpsl.data.pascal import REFERENCE_TASK_NAMES

    if not isinstance(data, Mapping) or not all(
        isinstance(v, list | tuple | np.ndarray) for v in data.values()
    ):
        raise DataError(f"split file {path}: expected a mapping task -> list of image ids")
    if task_names is None or image_ids is None:
        raise DataError(
            f"split file {path} lists image ids per task; the dataset must provide image ids "
            f"(e.g. pascal_context) to turn it into a split"
        )
    lists = {REFERENCE_TASK_NAMES.get(str(k), str(k)): [str(i) for i in v]
             for k, v in data.items()}
    missing = [t for t in task_names if t not in lists]
    if missing:
        raise DataError(
            f"split file {path} has no image list for task(s) {missing}; it has {sorted(lists)}"
        )
    row = {image_id: r for r, image_id in enumerate(image_ids)}
    labelled = np.zeros((len(image_ids), len(task_names)), dtype=bool)
    for t, name in enumerate(task_names):
        unknown = [i for i in lists[name] if i not in row]
        if unknown:
            raise DataError(
                f"split file {path}: task {name!r} lists ids not in the training set: "
                f"{unknown[:5]}"
            )
        labelled[[row[i] for i in lists[name]], t] = True
    return Split(labelled, tuple(task_names), regime=f"file:{path.name}")


def make_split(
    regime: str, n_images: int, task_names: Sequence[str], seed: int, **params
) -> Split:
    """Draw a split from a registered regime with its own seeded generator."""
    rng = np.random.default_rng(seed)
    labelled = REGIMES.get(regime)(n_images, len(task_names), rng, **params)
    split = Split(labelled, tuple(task_names), regime=regime, seed=seed, params=dict(params))
    if not split.labelled.any():  # a ValueError: the config's builder names labels.*
        raise ValueError(f"the {regime!r} regime labels no task on any of the {n_images} "
                         "training images: there would be nothing to train on (every loss 0)")
    return split
