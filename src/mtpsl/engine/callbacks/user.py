"""Callbacks named in the config (``train.callbacks``): imported by path and built with their
options, every failure a ConfigError naming the entry."""

from __future__ import annotations

import importlib
import inspect

from mtpsl.core.config import Config
from mtpsl.core.errors import ConfigError
from mtpsl.engine.callbacks.base import Callback


def build_callbacks(config: Config) -> list[Callback]:
    """One instance per ``train.callbacks`` entry, in order."""
    return [_build(entry.class_path, entry.options, f"train.callbacks[{n}]")
            for n, entry in enumerate(config.train.callbacks)]


def _build(path: str, options: dict, key: str) -> Callback:
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{key}: cannot import {module_name!r} ({err})") from None
    cls = getattr(module, attr, None)
    if not (inspect.isclass(cls) and issubclass(cls, Callback)):
        raise ConfigError(f"{key}: {path!r} is not a subclass of "
                          "mtpsl.engine.callbacks.Callback")
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as err:
        raise ConfigError(f"{key}.options: {err} (for {path})") from None
    return cls(**options)
