"""Evaluation: metrics accumulated globally over a split, on the predictions' device."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .faults import fault_point
from .metrics import METRICS, Metric
from .speed import autocast, to_channels_last
from .tasks import Task


def build_metrics(tasks: Mapping[str, Task]) -> dict[str, Metric]:
    return {name: METRICS.get(t.metric_name())(**t.metric_kwargs()) for name, t in tasks.items()}


def higher_is_better(tasks: Mapping[str, Task]) -> dict[str, bool]:
    """Direction of every flat ``task/metric`` key (what Delta_m and reports need)."""
    return {
        f"{name}/{key}": better
        for name, metric in build_metrics(tasks).items()
        for key, better in metric.higher_is_better.items()
    }


def primary_keys(tasks: Mapping[str, Task]) -> list[str]:
    """The one metric per task that Delta_m and the summary tables use."""
    return [f"{name}/{t.primary_key()}" for name, t in tasks.items()]


def accumulate(
    metrics: Mapping[str, Metric], preds: Mapping[str, Tensor], targets: Mapping[str, Tensor]
) -> None:
    """Update every task's streaming metric with one batch, on the predictions' device.

    Predictions go in as the model produced them (fp32 or bf16/fp16 under autocast): each
    metric converts what it needs itself, so segmentation scores are not copied to fp32 just
    to be argmax-ed (the conversion is exact, so the class map is the same).
    """
    for name, metric in metrics.items():
        metric.update(preds[name], targets[name])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    tasks: Mapping[str, Task],
    device: torch.device,
    progress: bool = True,
    desc: str = "eval",
    amp: str = "off",
    channels_last: bool = False,
) -> dict[str, float]:
    """Run ``model`` over ``loader``; return flat ``{"task/metric": value}``.

    ``amp`` autocasts the forward pass only; metrics take the predictions as the model
    returns them and convert what they need, on the device (no per-batch host copies).
    """
    metrics = build_metrics(tasks)
    was_training = model.training
    model.eval()
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
        batch = to_channels_last(batch.to(device, non_blocking=True), channels_last)
        with autocast(amp, device):
            preds = model(batch.image).preds
        accumulate(metrics, preds, batch.targets)
        fault_point("eval")
    model.train(was_training)
    return {
        f"{name}/{key}": value
        for name, metric in metrics.items()
        for key, value in metric.compute().items()
    }


def evaluate_checkpoint(
    run: str | None,
    checkpoint: str | None,
    split: str | None = None,
    root: str | None = None,
    device: str = "auto",
    edge_measure: str | None = None,
    edge_workers: int | None = None,
) -> dict:
    """``mtpsl eval``: rebuild a run's model from its checkpoint and evaluate it;
    ``edge_measure`` re-scores edge tasks with another measure (e.g. the published ``bsds``
    for a run monitored with ``dilation``), ``edge_workers`` in that many processes."""
    from .data.batch import PartialLabelSet
    from .experiment import eval_loader, open_dataset, resolve_device
    from .inference import load_run

    dev = resolve_device(device)
    loaded = load_run(run, checkpoint, root, dev)
    config = loaded.config
    split_name = split or config.dataset.eval_split
    dataset = open_dataset(config, split_name)
    tasks = loaded.tasks
    if edge_measure is not None or edge_workers is not None:
        tasks = {n: t.with_scoring(edge_measure, edge_workers) for n, t in tasks.items()}
    loader = eval_loader(PartialLabelSet(dataset, tasks), config, dev)
    metrics = evaluate(loaded.model, loader, tasks, dev, config.train.progress, split_name)
    return {"checkpoint": str(loaded.checkpoint), "epoch": loaded.epoch, "split": split_name,
            "root": config.dataset.root, "metrics": metrics}
