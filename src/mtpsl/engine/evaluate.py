"""Evaluation: metrics accumulated globally over a split, on the predictions' device.

A diverged model is not scored: :func:`evaluate` raises
:class:`~mtpsl.core.errors.NonFiniteResultError` when any prediction is NaN/inf or a metric is
infinite. A NaN metric of a task whose predictions are all finite is kept: it is how a metric
says that the split has no labelled pixel to score (see :mod:`mtpsl.metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mtpsl.core.errors import NonFiniteResultError, listed
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

    Raises :class:`~mtpsl.core.errors.NonFiniteResultError` (``found`` lists what) when the
    model's predictions or the metrics are non-finite (see :func:`nonfinite_results`).
    """
    metrics = build_metrics(tasks)
    finite: dict[str, Tensor] = {}
    """Per task, whether every prediction so far was finite (on the device: no sync)."""
    was_training = model.training
    model.eval()
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
        batch = to_channels_last(batch.to(device, non_blocking=True), channels_last)
        with autocast(amp, device):
            preds = model(batch.image).preds
        accumulate(metrics, preds, batch.targets)
        for name in metrics:
            ok = torch.isfinite(preds[name]).all()
            finite[name] = ok if name not in finite else finite[name] & ok
        fault_point("eval")
    model.train(was_training)
    scores = {
        f"{name}/{key}": value
        for name, metric in metrics.items()
        for key, value in metric.compute().items()
    }
    found = nonfinite_results(scores, [n for n, ok in finite.items() if not bool(ok)])
    if found:
        raise NonFiniteResultError(f"{desc}: non-finite results: {listed(found)}", found)
    return scores


def nonfinite_results(scores: Mapping[str, float], bad_tasks: list[str]) -> list[str]:
    """What makes an evaluation non-finite: every non-finite metric of a task whose
    predictions were NaN/inf (the task itself if its metrics happen to be finite, e.g. an
    argmax over NaN logits) and every infinite metric. NaN alone, with finite predictions,
    means "nothing to score" and is not a failure."""
    found = []
    for task in bad_tasks:
        own = [f"{k} = {v}" for k, v in scores.items()
               if k.startswith(f"{task}/") and not math.isfinite(v)]
        found += own or [f"{task} (predictions NaN/inf)"]
    found += [f"{k} = {v}" for k, v in scores.items()
              if math.isinf(v) and k.split("/", 1)[0] not in bad_tasks]
    return found
