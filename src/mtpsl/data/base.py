"""The dataset contract: what training, evaluation, splits and run records ask of a dataset.

A :class:`TaskDataset` holds ``N`` images, each an item ``{"image": [3, H, W], <task>: label,
"available": bool [T], "index": int}`` at one size ``height x width``; ``tasks`` names its
tasks; ``available`` says which labels exist on disk (bool ``[N, T]``, from file listings, no
decoding), so partial annotation is known before any item is read; ``file_listing`` feeds the
dataset fingerprint. Cross-dataset data also says which source each image comes from.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from mtpsl.core.errors import ConfigError
from mtpsl.tasks import Task


def check_split_name(split: str, root: str | Path) -> str:
    """``split`` when it names a place inside the dataset ``root`` (a folder, or a list
    file's stem): relative, without ``..``, not empty. A split is joined to the root, so
    ``dataset.train_split=../../x`` would read anything the process may read; raises
    ConfigError naming the keys a split comes from."""
    split = str(split)
    parts = re.split(r"[\\/]", split)
    if (not split.strip() or "\0" in split or split[0] in "/\\" or re.match(r"[A-Za-z]:", split)
            or ".." in parts or all(p in ("", ".") for p in parts)):
        raise ConfigError(
            f"dataset.train_split / dataset.eval_split / --split: {split!r} does not name a "
            f"split inside the dataset root {root}; a split is a folder or list name there, "
            "relative and without '..' (e.g. train, val)")
    return split


class TaskDataset(torch.utils.data.Dataset, ABC):
    """Base of every registered dataset (see the module docstring)."""

    tasks: dict[str, Task]
    task_names: tuple[str, ...]
    height: int
    width: int
    available: np.ndarray
    """bool ``[N, T]``: image ``i`` has a label file for task ``t`` (``task_names`` order)."""
    split: str | None = None
    image_ids: list[str] | None = None
    """Names of the images in item order, where the layout has them (PASCAL-Context)."""
    domain_ids: np.ndarray | None = None
    """Source of each image (int ``[N]``) for cross-dataset data; None for one source."""
    domain_names: tuple[str, ...] | None = None
    class_names: Mapping[str, tuple[str, ...]] = MappingProxyType({})
    """Names of the classes of each class-map task (by task name) where the layout defines
    them; checkpoints record them, so a model's outputs stay readable without the data."""

    def __len__(self) -> int:
        return int(self.available.shape[0])

    @abstractmethod
    def __getitem__(self, index: int) -> dict[str, Tensor]: ...

    @abstractmethod
    def file_listing(self) -> list[tuple[str, int]]:
        """(path relative to the root, size in bytes) of every file read (fingerprints)."""

    def source_eval_sets(self) -> dict[str, TaskDataset]:
        """Cross-dataset data: each source's own images of this split with every task it has
        on disk (evaluated as ``eval@<source>``); {} for a single source."""
        return {}

    @property
    def missing_counts(self) -> dict[str, int]:
        """Number of images without a label, per task (partially annotated data)."""
        return {n: int((~self.available[:, t]).sum()) for t, n in enumerate(self.task_names)}


def source_of(dataset: Dataset) -> TaskDataset:
    """The :class:`TaskDataset` under any ``Subset`` (the split's rows are its images); a
    TypeError for a dataset that does not keep the contract."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if not isinstance(dataset, TaskDataset):
        raise TypeError(f"{type(dataset).__name__} does not keep the dataset contract "
                        f"(subclass mtpsl.data.base.TaskDataset)")
    return dataset
