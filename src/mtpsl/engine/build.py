"""Build everything a run needs from a validated :class:`~mtpsl.core.config.Config`.

This is the only place that knows how config sections map to registry entries, so the
trainer, ``mtpsl eval`` and ``mtpsl compare`` construct runs identically.
"""

from __future__ import annotations

import inspect
import os
import random
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from mtpsl.core.config import REQUIRED_WEIGHTS, Config, trained_model
from mtpsl.core.errors import ConfigError
from mtpsl.core.registry import Registry
from mtpsl.data import DATASETS
from mtpsl.data.base import TaskDataset
from mtpsl.data.batch import Collate, PartialLabelSet
from mtpsl.data.sampling import ResumableSampler, check_balanced_batch, train_sampler
from mtpsl.data.splits import REGIMES, Split, make_split
from mtpsl.data.transforms import build_train_transform
from mtpsl.engine.speed import loader_workers
from mtpsl.methods import METHODS, Method, build_method
from mtpsl.models import MODELS, HeadSpec, PerTaskModels, build_model, check_input_size
from mtpsl.models.encoders import EncoderSpec
from mtpsl.tasks import Task
from mtpsl.weighting import WEIGHTINGS, Weighting, build_weighting


@dataclass
class Experiment:
    config: Config
    tasks: dict[str, Task]
    split: Split
    train_set: PartialLabelSet
    eval_set: PartialLabelSet
    val_set: PartialLabelSet | None
    model: nn.Module
    method: Method
    weighting: Weighting
    extra_evals: dict[str, PartialLabelSet] = field(default_factory=dict)
    """Further evaluation sets, logged as ``eval@<name>/<metric>`` (e.g. one per source
    dataset in cross-dataset training); the reported result stays ``eval/``."""


def lookup(registry: Registry, name: str, key: str) -> Callable:
    """Registry lookup whose error names the config key at fault."""
    try:
        return registry.get(name)
    except KeyError as err:
        raise ConfigError(f"{key}: {err.args[0]}") from None


def check_names(config: Config) -> None:
    """Every registered name the config uses exists; the error names the key and the
    registered names. Runs before any file is read (the schema itself stays torch-free)."""
    lookup(DATASETS, config.dataset.name, "dataset.name")
    lookup(MODELS, *trained_model(config))
    lookup(METHODS, config.method.name, "method.name")
    lookup(WEIGHTINGS, config.method.weighting, "method.weighting")
    if config.labels.file is None:
        lookup(REGIMES, config.labels.regime, "labels.regime")
    backbone = config.model.backbone
    if (config.train.require_weights and backbone.weights is None
            and takes_backbone(MODELS.get(trained_model(config)[0]))):
        raise ConfigError(REQUIRED_WEIGHTS)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} requested but CUDA is not available")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    # MaxUnpool has no flagged-deterministic kernel; on CPU it is deterministic anyway.
    warnings.filterwarnings("ignore", message=".*max_unpool.*deterministic.*")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:  # cuBLAS reads it when its first handle is made; without it, warnings
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    # Autotuned convolution algorithms: fastest for fixed input sizes, but not reproducible.
    torch.backends.cudnn.benchmark = not deterministic


def deterministic_algorithms(mode: bool) -> None:
    """``torch.use_deterministic_algorithms(mode, warn_only=True)``, without importing
    torch._inductor unless something already has: recent torch imports it there to set
    inductor's flag too, which costs 3 to 7 s of every run's start. A compiled model sets it
    again before compiling (:func:`mtpsl.engine.speed.prepare_model`)."""
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None or "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(mode, warn_only=True)
    else:
        setter(mode, warn_only=True)


def open_dataset(config: Config, split_name: str) -> TaskDataset:
    ds = config.dataset
    build = lookup(DATASETS, ds.name, "dataset.name")
    kwargs = dict(ds.options)
    if ds.tasks is not None:
        kwargs["tasks"] = tuple(ds.tasks)
    try:
        return build(ds.root, split_name, cache=ds.cache, **kwargs)
    except (TypeError, ValueError) as err:  # a bad task subset or dataset option
        raise ConfigError(f"dataset ({ds.name}, tasks/options): {err}") from None


def make_or_load_split(
    config: Config, n_images: int, task_names: tuple[str, ...], image_ids: list | None = None
) -> Split:
    labels = config.labels
    if labels.file:  # image_ids: for task -> id-list files (PASCAL-Context)
        split = Split.load(labels.file, task_names, image_ids)
        if len(split) != n_images:
            raise ConfigError(
                f"labels.file: {labels.file} has {len(split)} rows but the training set "
                f"has {n_images} images"
            )
        return split
    params = {"ratios": labels.ratios} if labels.regime == "ratio" else {}
    if labels.regime == "ratio" and labels.ratios is None:
        raise ConfigError("labels.ratios: required by the 'ratio' regime, e.g. [9, 1]")
    seed = config.seed if labels.seed is None else labels.seed
    try:
        return make_split(labels.regime, n_images, task_names, seed, **params)
    except ValueError as err:
        raise ConfigError(f"labels: {err}") from None


def carve_validation(n_images: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, val) index sets; the validation part only ever selects a best epoch."""
    order = np.random.default_rng([seed, 7919]).permutation(n_images)
    n_val = round(fraction * n_images)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def model_kwargs(build: Callable, config: Config) -> dict[str, object]:
    """Keyword arguments for a model builder: ``width``, ``backbone`` if it takes one, and
    ``model.options``, which must name the builder's keyword-only parameters."""
    params = inspect.signature(build).parameters
    allowed = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    for key in config.model.options:
        if key not in allowed:
            raise ConfigError(
                f"model.options.{key}: unknown option for model {trained_model(config)[0]!r}; "
                f"allowed: {', '.join(allowed) or '(none)'}"
            )
    kwargs: dict[str, object] = {"width": config.model.width, **config.model.options}
    if takes_backbone(build):
        kwargs["backbone"] = EncoderSpec(**config.model.backbone.model_dump())
    return kwargs


def takes_backbone(build: Callable) -> bool:
    """Whether a model builder builds an encoder from ``model.backbone``."""
    return "backbone" in inspect.signature(build).parameters


def _options_for_task(kwargs: dict[str, object], task: str, tasks: dict) -> dict[str, object]:
    """A one-task net's kwargs: mapping options lose the entries keyed by the other tasks."""
    return {
        k: {key: v for key, v in value.items() if key == task or key not in tasks}
        if isinstance(value, dict) else value
        for k, value in kwargs.items()
    }


def build_model_for(config: Config, tasks: dict[str, Task], method: Method) -> nn.Module:
    build = lookup(MODELS, *trained_model(config))
    heads = {name: HeadSpec.of(t) for name, t in tasks.items()}
    kwargs = model_kwargs(build, config)
    if method.per_task_networks:
        return PerTaskModels({
            name: build(heads={name: h}, **_options_for_task(kwargs, name, tasks))
            for name, h in heads.items()
        })
    return build_model(trained_model(config)[0], heads, **kwargs)


def method_for(config: Config, tasks: Mapping[str, Task]) -> Method:
    """The configured method, its name and options validated (errors name the keys)."""
    lookup(METHODS, config.method.name, "method.name")
    return build_method(config.method.name, tasks, config.method.options)


def weighting_for(config: Config, names: Sequence[str]) -> Weighting:
    """The configured loss weighting over ``names``, its options and gradients validated."""
    return build_weighting(config.method.weighting, tuple(names),
                           config.method.weighting_options, config.method.weighting_gradients)


def build_experiment(config: Config, split: Split | None = None) -> Experiment:
    """Datasets, split, model, method and weighting of a run (model on the CPU)."""
    check_names(config)
    train_full = open_dataset(config, config.dataset.train_split)
    eval_base = open_dataset(config, config.dataset.eval_split)
    tasks = dict(train_full.tasks)
    names = tuple(tasks)
    split = split or make_or_load_split(
        config, len(train_full), names, train_full.image_ids
    )

    method = method_for(config, tasks)
    aug = config.dataset.augment
    transform = build_train_transform(
        tuple(aug.scales), aug.flip, scale_range=aug.scale_range, crop_size=aug.crop_size,
        cat_max_ratio=aug.cat_max_ratio, photometric=aug.photometric)
    train_idx, val_idx = carve_validation(
        len(train_full), config.dataset.val_fraction, config.seed
    )
    train_set = PartialLabelSet(
        Subset(train_full, train_idx.tolist()), tasks, split.labelled[train_idx], transform,
        n_views=method.n_views, seed=config.seed,
    )
    domains = train_set.domain_ids()
    if domains is not None:
        check_balanced_batch(config.train.batch_size, len(np.unique(domains)))
    val_set = None
    if len(val_idx):
        # Validation images keep only the labels the regime gives them: selecting an epoch
        # must not read labels that training is denied.
        val_set = PartialLabelSet(Subset(train_full, val_idx.tolist()), tasks,
                                  split.labelled[val_idx])
    eval_set = PartialLabelSet(eval_base, tasks)

    weighting = weighting_for(config, names)
    model = build_model_for(config, tasks, method)
    for images in (train_full, eval_base):
        check_input_size(model, images.height, images.width, trained_model(config)[0])
    method.attach(model)
    return Experiment(
        config, tasks, split, train_set, eval_set, val_set, model, method, weighting,
        extra_evals=domain_evals(eval_base, tasks, method),
    )


def domain_evals(eval_base: TaskDataset, tasks: dict[str, Task], method: Method) -> dict:
    """Cross-dataset runs: each source's evaluation split with every task it has on disk,
    logged as ``eval@<source>/...`` (none for single-source data)."""
    sets = eval_base.source_eval_sets()
    if eval_base.domain_names is not None:
        method.check_sources(len(eval_base.domain_names))
    return {name: PartialLabelSet(view, tasks) for name, view in sets.items()}


def train_loader(
    exp: Experiment, device: torch.device, num_replicas: int = 1, rank: int = 0
) -> DataLoader:
    """Batches of ``train.batch_size`` images for process ``rank`` of ``num_replicas``.

    The shards interleave one seeded permutation (process r takes positions r, r + R, ...),
    so step k's batches of the R processes together hold exactly the images of step k of a
    single process with batch ``R x batch_size``.
    """
    cfg = exp.config.train
    if len(exp.train_set) < cfg.batch_size * num_replicas:
        raise ConfigError(
            f"train.batch_size: {cfg.batch_size} per process x {num_replicas} processes is "
            f"larger than the training set ({len(exp.train_set)} images)"
        )
    sampler = ResumableSampler(train_sampler(
        exp.train_set.domain_ids(), len(exp.train_set), cfg.batch_size, exp.config.seed,
        num_replicas, rank,
    ))
    return DataLoader(
        exp.train_set,
        batch_size=cfg.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=loader_workers(cfg.num_workers, device),
        collate_fn=Collate(tuple(exp.tasks)),
        pin_memory=device.type == "cuda",
        # its own generator: starting an epoch's iterator (which draws the workers' base
        # seed) must not consume the global RNG that the training steps draw from, so a run
        # resumed mid-epoch continues the same random stream (see train._fit)
        generator=torch.Generator().manual_seed(exp.config.seed),
    )


def eval_loader(dataset: PartialLabelSet, config: Config, device: torch.device) -> DataLoader:
    """In-order batches of ``train.eval_batch_size`` (evaluation runs on one process). Its
    own generator: starting an iterator draws the workers' base seed, which from the global
    stream would make training after an evaluation depend on whether one ran (a run extended
    by ``--resume train.epochs=...`` would then differ from one trained at that length)."""
    return DataLoader(
        dataset,
        batch_size=config.train.eval_batch_size,
        shuffle=False,
        num_workers=loader_workers(config.train.num_workers, device),
        collate_fn=Collate(tuple(dataset.tasks)),
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(config.seed),
    )
