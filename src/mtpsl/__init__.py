"""mtpsl: multi-task dense prediction learned from partially annotated images.

The Python API in a few names (imported on first use, so ``import mtpsl`` stays cheap)::

    import mtpsl

    config = mtpsl.load_config("synthetic_demo", ["dataset.root=data/synth", "train.epochs=2"])
    final = mtpsl.train(config, "runs/sl")          # final metrics; the run folder in runs/sl
    run = mtpsl.load_run("runs/sl")                 # no dataset needed
    maps = run.predict("room.png")                  # {"semantic": ..., "depth": ..., ...}
    table = mtpsl.compare(config, "runs/grid")      # the config's compare grid; markdown

The registries (``mtpsl.METHODS``, ``WEIGHTINGS``, ``MODELS``, ``TASKS``, ``DATASETS``,
``METRICS``) list what a config can name; ``mtpsl.resume(folder)`` continues a run.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "Config": "mtpsl.core.config",
    "load_config": "mtpsl.core.config",
    "train": "mtpsl.engine.run",
    "resume": "mtpsl.engine.run",
    "compare": "mtpsl.analysis.compare",
    "load_run": "mtpsl.inference.api",
    "TrainedRun": "mtpsl.inference.api",
    "METHODS": "mtpsl.methods",
    "WEIGHTINGS": "mtpsl.weighting",
    "MODELS": "mtpsl.models",
    "TASKS": "mtpsl.tasks",
    "DATASETS": "mtpsl.data",
    "METRICS": "mtpsl.metrics",
}
"""Public name -> the module that defines it."""

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'mtpsl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
