"""Evaluation: metrics accumulated globally over a split, on the predictions' device."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mtpsl.core.faults import fault_point
from mtpsl.engine.speed import autocast, to_channels_last
from mtpsl.metrics import Metric
from mtpsl.tasks import Task
from mtpsl.tasks.scoring import build_metrics


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
    channels_last: bool | str = False,
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
