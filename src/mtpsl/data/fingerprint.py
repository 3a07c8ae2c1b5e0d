"""Dataset fingerprints: what a checkpoint records so a resume can tell the data changed.

A fingerprint hashes the dataset's kind, split, size, tasks, image size, which labels exist,
and the name and byte size of every file it reads (``file_listing()``, relative to the
dataset's root, so a moved copy of the same files matches). It reads no file content: it costs
one ``stat`` per file.
"""

from __future__ import annotations

import hashlib

import numpy as np
from torch.utils.data import Dataset, Subset


def unwrap(dataset: Dataset) -> Dataset:
    """The dataset under any ``Subset`` (the split's rows are its images)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def fingerprint(dataset: Dataset) -> str:
    base = unwrap(dataset)
    hasher = hashlib.sha256()
    shape = (getattr(base, "height", None), getattr(base, "width", None))
    head = (type(base).__name__, getattr(base, "split", None), len(base),
            tuple(getattr(base, "task_names", ())), shape)
    hasher.update(repr(head).encode())
    available = getattr(base, "available", None)
    if isinstance(available, np.ndarray):
        hasher.update(np.ascontiguousarray(available, dtype=bool).tobytes())
    listing = getattr(base, "file_listing", None)
    if listing is not None:
        for name, size in listing():
            hasher.update(f"{name}\0{size}\0".encode())
    return hasher.hexdigest()
