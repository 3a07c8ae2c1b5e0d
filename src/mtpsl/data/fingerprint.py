"""Dataset fingerprints: what a checkpoint records so a resume can tell the data changed.

A fingerprint hashes the dataset's kind, split, size, tasks, image size, which labels exist,
and the name and byte size of every file it reads (``file_listing()``, relative to the
dataset's root, so a moved copy of the same files matches). It reads no file content: it costs
one ``stat`` per file.
"""

from __future__ import annotations

import hashlib

import numpy as np
from torch.utils.data import Dataset

from mtpsl.data.base import source_of


def fingerprint(dataset: Dataset) -> str:
    """SHA-256 of what identifies a dataset's content without reading it: its type, split,
    size, tasks, which labels exist and every file's name and size."""
    base = source_of(dataset)
    hasher = hashlib.sha256()
    head = (type(base).__name__, base.split, len(base), tuple(base.task_names),
            (base.height, base.width))
    hasher.update(repr(head).encode())
    hasher.update(np.ascontiguousarray(base.available, dtype=bool).tobytes())
    for name, size in base.file_listing():
        hasher.update(f"{name}\0{size}\0".encode())
    return hasher.hexdigest()
