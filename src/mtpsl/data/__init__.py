"""Datasets. Importing this package registers every built-in dataset in ``DATASETS``."""

from .batch import Batch, PartialLabelSet, View
from .layout import DATASETS, LayoutDataset

__all__ = ["DATASETS", "Batch", "LayoutDataset", "PartialLabelSet", "View"]
