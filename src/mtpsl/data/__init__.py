"""Datasets. Importing this package registers every built-in dataset in ``DATASETS``."""

from . import cross_domain, pascal  # noqa: F401  (register cross_domain, pascal_context)
from .batch import Batch, PartialLabelSet, View
from .layout import DATASETS, LayoutDataset

RELEASE_SIZES = {
    "nyuv2": {"train": 795, "val": 654},
    "cityscapes": {"train": 2975, "val": 500},
    "pascal_context": {"train": 4998, "val": 5105},
}
"""Images per split of the standard releases (MTAN's preprocessed NYUv2 and Cityscapes, the
PASCAL-Context multi-task benchmark): ``mtpsl data check`` says when a folder holds fewer."""

__all__ = ["DATASETS", "RELEASE_SIZES", "Batch", "LayoutDataset", "PartialLabelSet", "View"]
