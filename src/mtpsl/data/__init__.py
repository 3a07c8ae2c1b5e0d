"""Datasets. Importing this package registers every built-in dataset in ``DATASETS``."""

from . import cross_domain, pascal  # noqa: F401  (register cross_domain, pascal_context)
from .batch import Batch, PartialLabelSet, View
from .layout import DATASETS, LayoutDataset

__all__ = ["DATASETS", "Batch", "LayoutDataset", "PartialLabelSet", "View"]
