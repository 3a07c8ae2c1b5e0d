"""Datasets. Every module of this package is imported here, so each registers its datasets in
``DATASETS``: adding a dataset is adding a file (see ``docs/extending.md``)."""

from mtpsl.core.registry import discover
from mtpsl.data.batch import Batch, PartialLabelSet, View
from mtpsl.data.layout import DATASETS, LayoutDataset

discover(__name__, __path__)

RELEASE_SIZES = {
    "nyuv2": {"train": 795, "val": 654},
    "cityscapes": {"train": 2975, "val": 500},
    "pascal_context": {"train": 4998, "val": 5105},
}
"""Images per split of the standard releases (MTAN's preprocessed NYUv2 and Cityscapes, the
PASCAL-Context multi-task benchmark): ``mtpsl data check`` says when a folder holds fewer."""

__all__ = ["DATASETS", "RELEASE_SIZES", "Batch", "LayoutDataset", "PartialLabelSet", "View"]
