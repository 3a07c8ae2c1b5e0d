"""``mtpsl list [KIND]``: what can be named in a config, from the registries themselves.

Each entry is printed with the first paragraph of its docstring (a preset with its leading
comment), so a new method, model or weighting shows up here the moment it is registered.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mtpsl.core.registry import Registry


def _registries() -> dict[str, tuple[str, Callable[[], Registry]]]:
    """kind -> (the config key that names it, a loader of its registry)."""
    def methods():
        from mtpsl.methods import METHODS
        return METHODS

    def models():
        from mtpsl.models import MODELS
        return MODELS

    def weightings():
        from mtpsl.weighting import WEIGHTINGS
        return WEIGHTINGS

    def datasets():
        from mtpsl.data import DATASETS
        return DATASETS

    def tasks():
        from mtpsl.tasks import TASKS
        return TASKS

    def encoders():
        from mtpsl.models.encoders import ENCODERS
        return ENCODERS

    def regimes():
        from mtpsl.data.splits import REGIMES
        return REGIMES

    def metrics():
        import mtpsl.tasks  # noqa: F401  (metrics registered beside their task: keypoints)
        from mtpsl.metrics import METRICS
        return METRICS

    return {"methods": ("method.name", methods), "models": ("model.name", models),
            "encoders": ("model.backbone.name", encoders),
            "weightings": ("method.weighting", weightings),
            "datasets": ("dataset.name", datasets),
            "tasks": ("task types of the datasets' tasks", tasks),
            "regimes": ("labels.regime", regimes), "metrics": ("task metrics", metrics)}


KINDS = [*_registries(), "presets"]


def preset_summary(name: str, width: int = 100) -> str:
    """A preset's leading comment block on one line."""
    from importlib import resources

    from mtpsl.core.registry import summary_line

    text = (resources.files("mtpsl.presets") / f"{name}.yaml").read_text()
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# "))
    return summary_line(" ".join(lines), width)


def entries(kind: str, width: int = 100) -> list[tuple[str, str]]:
    """(name, one-line description, cut at ``width`` characters) of every entry of ``kind``."""
    if kind == "presets":
        from mtpsl.core.config import preset_names

        return [(n, preset_summary(n, width)) for n in preset_names()]
    registry = _registries()[kind][1]()
    return [(n, registry.describe(n, width)) for n in registry.names()]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "list", help="registered methods, models, weightings, datasets, tasks, regimes, "
        "metrics and presets, with one line each",
        description="List what a config can name. Without KIND: every kind.")
    p.add_argument("kind", nargs="?", choices=KINDS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    registries = _registries()
    for n, kind in enumerate([args.kind] if args.kind else KINDS):
        if n:
            print()
        key = "--config NAME" if kind == "presets" else registries[kind][0]
        print(f"{kind} ({key}):")
        found = entries(kind)
        pad = max(len(name) for name, _ in found)
        for name, text in found:
            print(f"  {name:<{pad}}  {text}")
