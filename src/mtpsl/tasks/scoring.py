"""How a set of tasks is scored: each task's registered metric, the direction of every metric
key, and the one key per task that stands for it in Delta_m. Used by evaluation, run summaries,
reports and figures alike."""

from __future__ import annotations

from collections.abc import Mapping

from mtpsl.metrics import METRICS, Metric
from mtpsl.tasks.base import Task


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
