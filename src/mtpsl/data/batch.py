"""From dataset items to training batches that carry their partial-label mask.

:class:`PartialLabelSet` wraps any dataset that yields ``{"image", <task>..., "available"}``
items. It applies the joint augmentation (one or two views), and *blanks* every target the
split marks as unlabelled, so no method can read a label the regime hides. Augmentation draws
come from a generator seeded by (seed, epoch, index): the same item is augmented identically
whatever the number of workers, which is what makes runs reproducible and resumable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from mtpsl.data.base import TaskDataset, source_of
from mtpsl.data.transforms import META_KEYS
from mtpsl.tasks import Task

Transform = Callable[[dict[str, Tensor], Mapping[str, Task], torch.Generator], dict[str, Tensor]]


@dataclass
class View:
    """One augmented view of a batch: images ``[B,3,H,W]``, per-task targets, and ``meta``.

    ``meta`` holds what the augmentation recorded per image (``"crop"`` float ``[B,3]`` =
    scale, top, left; ``"flip"`` bool ``[B]``; see :mod:`mtpsl.data.transforms`): for view1 it
    is the map from view0 to view1, which :func:`~mtpsl.data.transforms.replay` applies to
    view0's predictions. Empty when no transform ran (evaluation).
    """

    image: Tensor
    targets: dict[str, Tensor]
    meta: dict[str, Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> View:
        def move(t: Tensor) -> Tensor:
            return t.to(device, non_blocking=non_blocking)

        return View(
            move(self.image),
            {k: move(v) for k, v in self.targets.items()},
            {k: move(v) for k, v in self.meta.items()},
        )

    def pin_memory(self) -> View:
        return View(
            self.image.pin_memory(),
            {k: v.pin_memory() for k, v in self.targets.items()},
            {k: v.pin_memory() for k, v in self.meta.items()},
        )


@dataclass
class Batch:
    """What a method sees: views of the images, and which tasks are labelled per image."""

    views: list[View]
    labelled: Tensor
    """bool ``[B, T]``, T in ``task_names`` order."""
    index: Tensor
    task_names: tuple[str, ...]
    domain: Tensor | None = None
    """long ``[B]``: which source dataset each image comes from (cross-dataset training);
    None when the data has a single source."""

    @property
    def image(self) -> Tensor:
        return self.views[0].image

    @property
    def targets(self) -> dict[str, Tensor]:
        return self.views[0].targets

    def __len__(self) -> int:
        return self.index.shape[0]

    def labelled_for(self, task: str) -> Tensor:
        """bool ``[B]``: which images carry a label for ``task``."""
        return self.labelled[:, self.task_names.index(task)]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            [v.to(device, non_blocking) for v in self.views],
            self.labelled.to(device, non_blocking=non_blocking),
            self.index.to(device, non_blocking=non_blocking),
            self.task_names,
            None if self.domain is None else self.domain.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Batch:
        views = [v.pin_memory() for v in self.views]
        domain = None if self.domain is None else self.domain.pin_memory()
        return Batch(
            views, self.labelled.pin_memory(), self.index.pin_memory(), self.task_names, domain
        )


class PartialLabelSet(Dataset):
    """A dataset seen through a label split, an augmentation and a number of views.

    Args:
        dataset: yields dicts with ``image``, one target per task and ``available`` (bool [T]).
        tasks: the dataset's tasks in order (names must match the item keys).
        labelled: bool ``[N, T]`` split; None means every available label is used.
        transform: joint augmentation applied per view; None for evaluation.
        n_views: 2 for consistency methods (3 for jtr): each view after the first is the
            transform applied to view0 (independent draws).
        seed: base seed of the augmentation draws.
    """

    def __init__(
        self,
        dataset: TaskDataset | Subset,
        tasks: Mapping[str, Task],
        labelled: np.ndarray | None = None,
        transform: Transform | None = None,
        n_views: int = 1,
        seed: int = 0,
    ) -> None:
        if n_views < 1 or (n_views > 1 and transform is None):
            raise ValueError("n_views > 1 needs a transform (the views would be identical)")
        if labelled is not None and len(labelled) != len(dataset):
            raise ValueError(f"split has {len(labelled)} rows but the dataset {len(dataset)}")
        self.dataset = dataset
        self.source = source_of(dataset)
        """The :class:`TaskDataset` under any ``Subset`` (its size, tasks, sources)."""
        self.tasks = dict(tasks)
        self.labelled = None if labelled is None else torch.as_tensor(labelled, dtype=torch.bool)
        self.transform = transform
        self.n_views = n_views
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draws (call before creating the epoch's iterator)."""
        self.epoch = epoch

    def domain_ids(self) -> np.ndarray | None:
        """Source dataset of each item (cross-dataset data), or None for a single source.

        Read from the wrapped dataset's ``domain_ids``, through any ``Subset``.
        """
        dataset: Dataset = self.dataset
        index = np.arange(len(self))
        while isinstance(dataset, Subset):
            index = np.asarray(dataset.indices)[index]
            dataset = dataset.dataset
        ids = self.source.domain_ids
        return None if ids is None else np.asarray(ids)[index]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        labelled = item["available"].clone()
        if self.labelled is not None:
            labelled &= self.labelled[i]
        sample = {"image": item["image"][None]}
        sample.update({name: item[name][None] for name in self.tasks})
        generator = torch.Generator().manual_seed(_item_seed(self.seed, self.epoch, i))
        first = sample if self.transform is None else self.transform(sample, self.tasks, generator)
        views = [self._hide_unlabelled(first, labelled)]
        for _ in range(1, self.n_views):  # every later view is a fresh transform of view 0
            assert self.transform is not None
            again = self.transform(first, self.tasks, generator)
            views.append(self._hide_unlabelled(again, labelled))
        out = {"views": views, "labelled": labelled, "index": torch.tensor(i)}
        if "domain" in item:
            out["domain"] = torch.as_tensor(item["domain"], dtype=torch.long)
        return out

    def _hide_unlabelled(self, sample: dict[str, Tensor], labelled: Tensor) -> View:
        targets = {}
        for k, (name, task) in enumerate(self.tasks.items()):
            target = sample[name]
            targets[name] = (target if labelled[k] else task.blank_like(target))[0]
        meta = {k: sample[k][0] for k in META_KEYS if k in sample}
        return View(sample["image"][0], targets, meta)


def _item_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def collate(items: Sequence[dict], task_names: Sequence[str]) -> Batch:
    """Stack :class:`PartialLabelSet` items into a :class:`Batch`."""
    n_views = len(items[0]["views"])
    views = []
    for v in range(n_views):
        image = torch.stack([it["views"][v].image for it in items])
        targets = {t: torch.stack([it["views"][v].targets[t] for it in items]) for t in task_names}
        metas = [it["views"][v].meta for it in items]
        keys = [k for k in metas[0] if all(k in m for m in metas)]  # keys every item has
        meta = {k: torch.stack([m[k] for m in metas]) for k in keys}
        views.append(View(image, targets, meta))
    labelled = torch.stack([it["labelled"] for it in items])
    index = torch.stack([it["index"] for it in items])
    domain = torch.stack([it["domain"] for it in items]) if "domain" in items[0] else None
    return Batch(views, labelled, index, tuple(task_names), domain)


class Collate:
    """Picklable collate_fn bound to the task order (DataLoader workers need to pickle it)."""

    def __init__(self, task_names: Sequence[str]) -> None:
        self.task_names = tuple(task_names)

    def __call__(self, items: Sequence[dict]) -> Batch:
        return collate(items, self.task_names)
