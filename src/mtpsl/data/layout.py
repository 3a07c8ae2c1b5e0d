"""Datasets stored in the de-facto standard MTAN/MTPSL ``.npy`` layout.

``ROOT/{split}/{folder}/{i}.npy`` with ``i = 0..N-1`` (decimal, no padding) and ``N`` the number
of files in ``image/``. A task folder may lack some indices: such images are *partially
annotated* and get an all-invalid target (``task.blank_like``) plus ``available = False``.

Construction checks the whole folder from the ``.npy`` headers only (names, shapes, dtypes,
truncation), so a broken dataset fails in seconds with one :class:`DataError` naming the file,
not hours into training. Values (NaN, label range) are checked when an item is decoded.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtpsl.core.errors import ConfigError, DataError
from mtpsl.core.registry import Registry
from mtpsl.data.base import TaskDataset, check_split_name
from mtpsl.tasks import TASKS, Task, build_task

DATASETS: Registry[Callable[..., TaskDataset]] = Registry("dataset")

_INDEX_NAME = re.compile(r"(0|[1-9][0-9]*)\.npy")
_NUMERIC_KINDS = "biuf"
_IMAGE_TOLERANCE = 1e-3  # float images slightly outside [0, 1] from resampling are fine


def _ls(folder: Path) -> str:
    """Folder contents for error messages (what *is* there helps spot a typo)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return "(unreadable)"
    return ", ".join(names) if names else "(empty)"


def read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a ``.npy`` file without reading its data.

    Also checks the data is not truncated (file size vs. header), the cheap way to catch an
    interrupted copy before it fails deep inside a DataLoader worker.
    """
    try:
        with open(path, "rb") as fp:
            version = np.lib.format.read_magic(fp)
            if version == (1, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_1_0(fp)
            else:  # 2.0 and 3.0 differ only in the header-length width / text encoding
                shape, _fortran, dtype = np.lib.format.read_array_header_2_0(fp)
            offset = fp.tell()
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        raise DataError(f"{path}: not a readable .npy file ({exc})") from None
    if dtype.hasobject:
        raise DataError(f"{path}: object dtype {dtype} is not allowed (arrays must be numeric)")
    if dtype.kind not in _NUMERIC_KINDS:
        raise DataError(f"{path}: dtype {dtype} is not numeric (expected a float or int array)")
    if any(d < 0 for d in shape):
        raise DataError(f"{path}: not a readable .npy file (negative dimension in {shape})")
    # Python ints: a crafted header's huge shape must not overflow (or wrap around) here
    expected = offset + dtype.itemsize * math.prod(int(d) for d in shape)
    actual = path.stat().st_size
    if actual < expected:
        raise DataError(
            f"{path}: truncated .npy file ({actual} bytes, header {shape} {dtype} needs {expected})"
        )
    return tuple(int(d) for d in shape), dtype


def _index_files(folder: Path) -> dict[int, Path]:
    """Map index -> file for every ``*.npy`` in ``folder``; bad names are errors."""
    files: dict[int, Path] = {}
    for entry in sorted(os.listdir(folder)):
        if not entry.endswith(".npy"):
            continue  # stray files (README, .DS_Store) are harmless
        if not _INDEX_NAME.fullmatch(entry):
            raise DataError(
                f"{folder / entry}: file name must be a decimal index without padding "
                f"(0.npy, 1.npy, ...), got {entry!r}"
            )
        files[int(entry[:-4])] = folder / entry
    return files


def _expected_shapes(task: Task | None, h: int, w: int) -> list[tuple[int, ...]]:
    if task is None:  # the image
        return [(h, w, 3)]
    c = task.label_dims
    if c == 0:
        return [(h, w)]
    if c == 1:
        return [(h, w, 1), (h, w)]
    return [(h, w, c)]


class LayoutDataset(TaskDataset):
    """Reads ``ROOT/{split}/{folder}/{i}.npy`` for the image and every task.

    Items: ``"image"`` float32 ``[3,H,W]`` in [0,1]; per task its per-sample target
    (class map int64 ``[H,W]`` with -1 ignore, or float32 ``[C,H,W]``), a blank one where the
    file is missing; ``"index"`` int64 scalar; ``"available"`` bool ``[T]``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        tasks: Mapping[str, Task],
        folders: Mapping[str, str],
        *,
        cache: bool = False,
    ) -> None:
        self.root = Path(root)
        self.split = check_split_name(split, root)  # joined to the root: must stay inside it
        self.tasks: dict[str, Task] = dict(tasks)
        self.task_names: tuple[str, ...] = tuple(self.tasks)
        if not self.tasks:
            raise ValueError("a LayoutDataset needs at least one task")
        missing_keys = [k for k in ("image", *self.task_names) if k not in folders]
        if missing_keys:
            raise ValueError(f"folders has no entry for {', '.join(missing_keys)}")
        self.folders = {k: folders[k] for k in ("image", *self.task_names)}
        self.cache = cache
        self._cache: dict[int, dict[str, np.ndarray | None]] = {}
        self._scan()

    # -- construction-time validation (headers only) ---------------------------------------
    def _scan(self) -> None:
        if not self.root.is_dir():
            raise DataError(f"dataset root {self.root} does not exist")
        split_dir = self.root / str(self.split)
        if not split_dir.is_dir():
            raise DataError(
                f"split folder {split_dir} does not exist; {self.root} holds: {_ls(self.root)}"
            )
        for key, sub in self.folders.items():
            if not (split_dir / sub).is_dir():
                what = "image" if key == "image" else f"task {key!r}"
                raise DataError(
                    f"folder {split_dir / sub} (for {what}) does not exist; "
                    f"{split_dir} holds: {_ls(split_dir)}"
                )

        image_dir = split_dir / self.folders["image"]
        images = _index_files(image_dir)
        if not images:
            raise DataError(f"{image_dir} holds no .npy files")
        n = len(images)
        top = max(images) + 1
        if top != n:  # report against the largest index: that is what the user meant N to be
            gaps = [i for i in range(top) if i not in images]
            shown = ", ".join(map(str, gaps[:10])) + (", ..." if len(gaps) > 10 else "")
            raise DataError(f"{image_dir}: indices must be 0..N-1; missing {shown} (N={top})")

        shape0, _ = read_npy_header(images[0])
        if len(shape0) != 3 or shape0[2] != 3:
            raise DataError(f"{images[0]}: expected image shape (H, W, 3), got {shape0}")
        if 0 in shape0:  # every file must match it: a whole split of nothing to train on
            raise DataError(f"{images[0]}: empty image (shape {shape0})")
        self.height, self.width = shape0[0], shape0[1]

        self._paths: dict[str, list[Path | None]] = {}
        self._check_files(images, None, "image")
        self._paths["image"] = [images[i] for i in range(n)]

        available = np.zeros((n, len(self.task_names)), dtype=bool)
        for t, name in enumerate(self.task_names):
            folder = split_dir / self.folders[name]
            files = _index_files(folder)
            extra = sorted(i for i in files if i >= n)
            if extra:
                raise DataError(
                    f"{files[extra[0]]}: index {extra[0]} has no image in {image_dir} (N={n})"
                )
            self._check_files(files, self.tasks[name], name)
            self._paths[name] = [files.get(i) for i in range(n)]
            available[:, t] = [i in files for i in range(n)]
        self.available = available

    def _check_files(self, files: Mapping[int, Path], task: Task | None, name: str) -> None:
        allowed = _expected_shapes(task, self.height, self.width)
        for path in files.values():
            shape, dtype = read_npy_header(path)
            if shape not in allowed:
                want = " or ".join(str(s) for s in allowed)
                raise DataError(f"{path}: expected {name} shape {want}, got {shape}")
            if task is None and dtype.kind not in "f" and dtype != np.uint8:
                raise DataError(f"{path}: image dtype must be float in [0,1] or uint8, got {dtype}")

    # -- public helpers ---------------------------------------------------------------------
    def file_listing(self) -> list[tuple[str, int]]:
        """(path relative to the root, size in bytes) of every file read (fingerprints)."""
        return [(p.relative_to(self.root).as_posix(), p.stat().st_size)
                for paths in self._paths.values() for p in paths if p is not None]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, "
            f"size={self.height}x{self.width}, tasks={list(self.task_names)})"
        )

    # -- decoding -----------------------------------------------------------------------------
    def _load(self, path: Path) -> np.ndarray:
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"{path}: cannot read .npy file ({exc})") from None

    def _read_checked(self, key: str, path: Path) -> np.ndarray:
        arr = self._load(path)
        task = self.tasks.get(key)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise DataError(f"{path}: holds NaN or inf values ({bad} of {arr.size})")
        if task is None:
            if arr.dtype.kind == "f":
                lo, hi = float(arr.min()), float(arr.max())
                if lo < -_IMAGE_TOLERANCE or hi > 1 + _IMAGE_TOLERANCE:
                    raise DataError(f"{path}: image values must lie in [0,1], found [{lo}, {hi}]")
        else:
            problem = task.label_problem(arr)
            if problem:
                raise DataError(f"{path}: {problem}")
        return arr

    def _arrays(self, index: int) -> dict[str, np.ndarray | None]:
        if self.cache and index in self._cache:
            return self._cache[index]
        arrays: dict[str, np.ndarray | None] = {}
        for key in ("image", *self.task_names):
            path = self._paths[key][index]
            arrays[key] = None if path is None else self._read_checked(key, path)
        if self.cache:
            self._cache[index] = arrays
        return arrays

    def _to_target(self, task: Task, arr: np.ndarray | None) -> Tensor:
        h, w = self.height, self.width
        if task.label_dims == 0:
            if arr is None:
                return task.blank_like(torch.zeros(h, w, dtype=torch.int64))
            return torch.from_numpy(arr.astype(np.int64))
        if arr is None:
            return task.blank_like(torch.zeros(task.label_dims, h, w, dtype=torch.float32))
        t = torch.from_numpy(arr.astype(np.float32))  # astype copies: the cache stays intact
        return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index = int(index) % n
        arrays = self._arrays(index)
        image = arrays["image"]
        assert image is not None
        if image.dtype == np.uint8:
            img = torch.from_numpy(image.astype(np.float32) / 255.0)
        else:
            img = torch.from_numpy(image.astype(np.float32))
        item: dict[str, Tensor] = {"image": img.permute(2, 0, 1).contiguous()}
        for name, task in self.tasks.items():
            item[name] = self._to_target(task, arrays[name])
        item["index"] = torch.tensor(index, dtype=torch.int64)
        item["available"] = torch.from_numpy(self.available[index].copy())
        return item


def _select(requested: Iterable[str], allowed: Sequence[str], dataset: str) -> list[str]:
    if isinstance(requested, str):
        requested = (requested,)
    names = list(requested)
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(
            f"unknown {dataset} task(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(allowed)}"
        )
    if not names:
        raise ValueError(f"{dataset}: tasks must name at least one of {', '.join(allowed)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{dataset}: tasks {names} lists a task twice")
    return names


ExtraTasks = Mapping[str, Mapping[str, Any]] | None

NYUV2_CLASSES = ("bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture",
                 "sofa", "table", "tv", "wall", "window")
"""The 13 NYUv2 classes of Couprie et al. in label order (MTAN's ``label`` 0..12)."""
CITYSCAPES_CLASSES = {
    7: ("flat", "construction", "object", "nature", "sky", "human", "vehicle"),
    19: ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
         "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
         "bus", "train", "motorcycle", "bicycle"),
}
"""Cityscapes' 7 categories (MTAN's ``label_7``) and 19 train ids (``label_19``), in order."""


def known_names(
    task_names: Iterable[str], names: Mapping[str, tuple[str, ...]]
) -> dict[str, tuple[str, ...]]:
    """The class names (``TaskDataset.class_names``) of those of ``task_names`` in ``names``."""
    return {task: names[task] for task in task_names if task in names}


def with_extra_tasks(
    allowed: dict[str, tuple[Task, str]], extra: ExtraTasks, dataset: str
) -> dict[str, tuple[Task, str]]:
    """The dataset's own tasks plus ``dataset.options.extra_tasks``: ``{name: {type: <task
    type>, folder: <folder, default the name>, <task options>...}}``, so a task type added to
    ``mtpsl.tasks`` trains on any layout dataset that has a folder of its labels."""
    out = dict(allowed)
    for name, spec in (extra or {}).items():
        key = f"dataset.options.extra_tasks.{name}"
        if name in out:
            raise ConfigError(f"{key}: {dataset} already has a task {name!r}")
        if not isinstance(spec, Mapping) or "type" not in spec:
            raise ConfigError(f"{key}: give at least the task type, e.g. {{type: "
                              f"{TASKS.names()[0]}}}; task types: {', '.join(TASKS.names())}")
        kwargs = {k: v for k, v in spec.items() if k not in ("type", "folder")}
        try:
            task = build_task(str(spec["type"]), name, **kwargs)
        except KeyError as err:
            raise ConfigError(f"{key}.type: {err.args[0]}") from None
        except TypeError as err:
            raise ConfigError(f"{key}: {err}") from None
        out[name] = (task, str(spec.get("folder", name)))
    return out


@DATASETS.register("nyuv2")
def nyuv2(
    root: str | Path,
    split: str,
    *,
    tasks: Iterable[str] | None = None,
    extra_tasks: ExtraTasks = None,
    cache: bool = False,
) -> LayoutDataset:
    """NYUv2 (13-class semantics, depth in metres, surface normals; more from
    ``dataset.options.extra_tasks``)."""
    allowed = with_extra_tasks({
        "semantic": (build_task("segmentation", "semantic", num_classes=13), "label"),
        "depth": (build_task("depth", "depth"), "depth"),
        "normal": (build_task("normal", "normal"), "normal"),
    }, extra_tasks, "nyuv2")
    names = _select(list(allowed) if tasks is None else tasks, list(allowed), "nyuv2")
    folders = {"image": "image", **{n: allowed[n][1] for n in names}}
    ds = LayoutDataset(root, split, {n: allowed[n][0] for n in names}, folders, cache=cache)
    ds.class_names = known_names(ds.task_names, {"semantic": NYUV2_CLASSES})
    return ds


@DATASETS.register("cityscapes")
def cityscapes(
    root: str | Path,
    split: str,
    *,
    tasks: Iterable[str] | None = None,
    num_classes: int = 7,
    extra_tasks: ExtraTasks = None,
    cache: bool = False,
) -> LayoutDataset:
    """Cityscapes in the MTAN layout (7- or 19-class semantics, disparity as ``depth``; more
    from ``dataset.options.extra_tasks``)."""
    if num_classes not in (7, 19):
        raise ValueError(f"cityscapes num_classes must be 7 or 19, got {num_classes!r}")
    allowed = with_extra_tasks({
        "semantic": (
            build_task("segmentation", "semantic", num_classes=num_classes),
            f"label_{num_classes}",
        ),
        "depth": (build_task("depth", "depth"), "depth"),
    }, extra_tasks, "cityscapes")
    names = _select(list(allowed) if tasks is None else tasks, list(allowed), "cityscapes")
    folders = {"image": "image", **{n: allowed[n][1] for n in names}}
    ds = LayoutDataset(root, split, {n: allowed[n][0] for n in names}, folders, cache=cache)
    ds.class_names = known_names(ds.task_names, {"semantic": CITYSCAPES_CLASSES[num_classes]})
    return ds
