"""``cross_domain``: several datasets trained together, each labelled for a subset of the tasks
(SemiMTL, seed 002: e.g. source A labels segmentation only, source B depth only).

Config::

    dataset:
      name: cross_domain
      root: data/pair            # relative source roots are resolved against it
      options:
        domains:
          - {name: cityscapes, root: domain_a, tasks: [semantic], options: {num_classes: 7}}
          - {name: cityscapes, root: domain_b, tasks: [depth], options: {num_classes: 7}}

Each source is opened with ITS ``tasks`` only (so its other label folders, if any, are never
read for training). Items carry the union of the tasks (in order of first appearance), a blank
target and ``available = False`` for the tasks their source does not label, and ``"domain"``
(the source's index); ``domain_ids`` lists it per item so the trainer draws domain-balanced
batches. Every source must share the image size and the definition of every task it shares
with another source (e.g. the number of classes).

:func:`domain_eval_sets` gives each source's evaluation split read with every task of the
union it has on disk (a per-domain ``eval_tasks`` list overrides the discovery): this is how a
task is evaluated on a source that never labels it for training.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from mtpsl.core.errors import ConfigError, DataError
from mtpsl.data.base import TaskDataset
from mtpsl.data.layout import DATASETS
from mtpsl.tasks import Task

KEY = "dataset.options.domains"


class DomainSpec(BaseModel):
    """One source of a ``cross_domain`` dataset."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    name: str
    """A registered dataset (nyuv2, cityscapes, ...); not cross_domain itself."""
    root: str
    tasks: list[str] = Field(min_length=1)
    """The tasks this source labels for training."""
    options: dict[str, Any] = {}
    """The source dataset's own keyword arguments (e.g. ``num_classes``)."""
    label: str | None = None
    """Name of the source in logs (``eval@<label>/...``); default ``<index>_<name>``."""
    eval_tasks: list[str] | None = None
    """Tasks of its evaluation split; None = every task of the union it has on disk."""


def parse_domains(domains: Any) -> list[DomainSpec]:
    """Validate the ``domains`` option; errors name the key and the allowed fields."""
    if not isinstance(domains, Sequence) or isinstance(domains, str) or len(domains) < 2:
        raise ConfigError(
            f"{KEY}: must be a list of at least 2 sources, each like "
            "{name: cityscapes, root: DIR, tasks: [semantic]}; got "
            f"{domains!r}"
        )
    specs = []
    for i, entry in enumerate(domains):
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{KEY}[{i}]: must be a mapping, got {entry!r}")
        try:
            specs.append(DomainSpec.model_validate(dict(entry)))
        except ValidationError as err:
            details = "; ".join(
                f"{KEY}[{i}].{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()
            )
            allowed = ", ".join(DomainSpec.model_fields)
            raise ConfigError(f"{details} (allowed keys: {allowed})") from None
        if specs[-1].name == "cross_domain":
            raise ConfigError(f"{KEY}[{i}].name: a source cannot itself be cross_domain")
    labels = [domain_label(i, s) for i, s in enumerate(specs)]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{KEY}: source labels {labels} must be distinct")
    return specs


def domain_label(index: int, spec: DomainSpec) -> str:
    return spec.label or f"{index}_{spec.name}"


def _open_source(
    root: str | Path, spec: DomainSpec, index: int, split: str, tasks: Sequence[str], cache: bool
) -> TaskDataset:
    try:
        build = DATASETS.get(spec.name)
    except KeyError as err:
        raise ConfigError(f"{KEY}[{index}].name: {err.args[0]}") from None
    path = Path(root) / spec.root
    try:
        return build(path, split, tasks=tuple(tasks), cache=cache, **spec.options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{KEY}[{index}] ({spec.name}, tasks/options): {err}") from None


def union_tasks(sources: Sequence[TaskDataset], specs: Sequence[DomainSpec]) -> dict[str, Task]:
    """The tasks of all sources in order of first appearance; shared ones must agree."""
    tasks: dict[str, Task] = {}
    owner: dict[str, int] = {}
    for i, src in enumerate(sources):
        for name, task in src.tasks.items():
            if name in tasks and tasks[name] != task:
                raise DataError(
                    f"{KEY}: task {name!r} differs between source {owner[name]} "
                    f"({specs[owner[name]].name}: {tasks[name]}) and source {i} "
                    f"({specs[i].name}: {task}); shared tasks must have the same definition"
                )
            tasks.setdefault(name, task)
            owner.setdefault(name, i)
    return tasks


def _check_sizes(sources: Sequence[TaskDataset], specs: Sequence[DomainSpec], split: str) -> None:
    sizes = [(s.height, s.width) for s in sources]
    if len(set(sizes)) > 1:
        listed = ", ".join(
            f"{i} ({sp.root}): {h}x{w}"
            for i, (sp, (h, w)) in enumerate(zip(specs, sizes, strict=True))
        )
        raise DataError(
            f"{KEY}: every source must have the same image size on split {split!r}; got {listed}"
        )


class UnionView(TaskDataset):
    """One source seen with the union's tasks: blank targets / unavailable where it lacks one."""

    def __init__(self, source: TaskDataset, tasks: Mapping[str, Task], domain: int) -> None:
        self.source = source
        self.tasks = dict(tasks)
        self.task_names = tuple(self.tasks)
        self.domain = domain
        self.height, self.width = source.height, source.width
        own = [n for n in self.task_names if n in source.tasks]
        self._own = [self.task_names.index(n) for n in own]
        self._src_cols = [source.task_names.index(n) for n in own]
        avail = np.zeros((len(source), len(self.task_names)), dtype=bool)
        avail[:, self._own] = source.available[:, self._src_cols]
        self.available = avail
        self.domain_ids = np.full(len(source), domain, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.source)

    def file_listing(self) -> list[tuple[str, int]]:
        return self.source.file_listing()

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        item = self.source[index]
        out: dict[str, Tensor] = {"image": item["image"], "index": item["index"]}
        h, w = self.height, self.width
        for name, task in self.tasks.items():
            if name in item:
                out[name] = item[name]
            elif task.label_dims == 0:
                out[name] = task.blank_like(torch.zeros(h, w, dtype=torch.int64))
            else:
                out[name] = task.blank_like(torch.zeros(task.label_dims, h, w))
        out["available"] = torch.from_numpy(self.available[index].copy())
        out["domain"] = torch.tensor(self.domain, dtype=torch.int64)
        return out


class CrossDomainDataset(TaskDataset):
    """The concatenation of several :class:`UnionView` s (one per source)."""

    domain_names: tuple[str, ...]

    def __init__(self, parts: Sequence[UnionView], labels: Sequence[str]) -> None:
        self.opened_with: tuple = ()
        """(root, domains, split, cache) it was opened with: how to open its sources alone."""
        self.parts = list(parts)
        self.domain_names = tuple(labels)
        self.tasks = dict(self.parts[0].tasks)
        self.task_names = tuple(self.tasks)
        self.height, self.width = self.parts[0].height, self.parts[0].width
        self._starts = list(np.cumsum([0] + [len(p) for p in self.parts[:-1]]))
        self.available = np.concatenate([p.available for p in self.parts])
        self.domain_ids = np.concatenate([p.domain_ids for p in self.parts])

    def source_eval_sets(self) -> dict[str, TaskDataset]:
        root, domains, split, cache = self.opened_with
        return dict(domain_eval_sets(root, domains, split, self.tasks, cache))

    def file_listing(self) -> list[tuple[str, int]]:
        return [(f"{label}/{name}", size) for label, part in zip(self.domain_names, self.parts,
                                                                  strict=True)
                for name, size in part.file_listing()]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index = int(index) % n
        part = bisect.bisect_right(self._starts, index) - 1
        item = self.parts[part][index - self._starts[part]]
        item["index"] = torch.tensor(index, dtype=torch.int64)
        return item

    def __repr__(self) -> str:
        return (
            f"CrossDomainDataset(n={len(self)}, size={self.height}x{self.width}, "
            f"domains={list(self.domain_names)}, tasks={list(self.task_names)})"
        )


@DATASETS.register("cross_domain")
def cross_domain(
    root: str | Path,
    split: str,
    *,
    domains: Any = None,
    tasks: Sequence[str] | None = None,
    cache: bool = False,
) -> CrossDomainDataset:
    """Several sources, each labelled for its ``tasks`` (see the module docstring)."""
    specs = parse_domains(domains)
    sources = [_open_source(root, s, i, split, s.tasks, cache) for i, s in enumerate(specs)]
    _check_sizes(sources, specs, split)
    union = union_tasks(sources, specs)
    if tasks is not None:
        unknown = [t for t in tasks if t not in union]
        if unknown:
            raise ValueError(
                f"unknown cross_domain task(s) {unknown}; the sources label {list(union)}"
            )
        union = {t: union[t] for t in union if t in tasks}
    parts = [UnionView(src, union, i) for i, src in enumerate(sources)]
    dataset = CrossDomainDataset(parts, [domain_label(i, s) for i, s in enumerate(specs)])
    # (split stays None: it is part of the fingerprint, which recorded runs must keep matching)
    dataset.opened_with = (root, domains, split, cache)
    return dataset


def _probe_tasks(
    root: str | Path, spec: DomainSpec, index: int, split: str, union: Mapping[str, Task]
) -> list[str]:
    """The union's tasks this source has on ``split``: its training tasks (which must be
    there), then every other task it can open (no folder or no such task: left out)."""
    _open_source(root, spec, index, split, spec.tasks, cache=False)
    found = list(spec.tasks)
    for name in union:
        if name in found:
            continue
        try:
            src = _open_source(root, spec, index, split, [name], cache=False)
        except ConfigError:  # the source type has no such task
            continue
        except DataError as err:
            if "does not exist" in str(err):  # no folder for it on disk
                continue
            raise
        if src.tasks[name] != union[name]:
            raise DataError(
                f"{KEY}[{index}]: task {name!r} of its {split!r} split is "
                f"{src.tasks[name]}, but the training sources define {union[name]}"
            )
        found.append(name)
    return found


def domain_eval_sets(
    root: str | Path, domains: Any, split: str, union: Mapping[str, Task], cache: bool = False
) -> dict[str, UnionView]:
    """Per source (by label): its ``split`` read with every union task it has, as a
    :class:`UnionView` over the union (tasks it lacks are blank and unavailable)."""
    specs = parse_domains(domains)
    out = {}
    for i, spec in enumerate(specs):
        names = spec.eval_tasks
        if names is None:
            names = _probe_tasks(root, spec, i, split, union)
        else:
            unknown = [t for t in names if t not in union]
            if unknown:
                raise ConfigError(
                    f"{KEY}[{i}].eval_tasks: {unknown} are not tasks of the union {list(union)}"
                )
        if not names:
            continue
        src = _open_source(root, spec, i, split, names, cache)
        out[domain_label(i, spec)] = UnionView(src, union, i)
    return out


PAIR_FOLDERS = ("domain_a", "domain_b")


def write_synthetic_pair(
    root: str | Path,
    *,
    layout: str,
    n_train: int,
    n_val: int,
    height: int,
    width: int,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Path, Path]:
    """Two synthetic datasets with an appearance gap: ``root/domain_a`` (style a, scenes of
    ``seed``) and ``root/domain_b`` (style b: other textures, light, colours, haze and
    vignetting; scenes of ``seed + 1``). Both have every label; a ``cross_domain`` config says
    which ones each source contributes to training."""
    from mtpsl.data import synthetic

    writer = {
        "nyuv2": synthetic.write_nyuv2_layout,
        "cityscapes": synthetic.write_cityscapes_layout,
    }[layout]
    root = Path(root)
    out = []
    for k, (folder, style) in enumerate(zip(PAIR_FOLDERS, ("a", "b"), strict=True)):
        out.append(
            writer(
                root / folder,
                n_train=n_train,
                n_val=n_val,
                height=height,
                width=width,
                seed=seed + k,
                style=style,
                progress=progress,
            )
        )
    return out[0], out[1]
