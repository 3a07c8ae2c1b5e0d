"""The model card: what a checkpoint needs to rebuild its model and tasks without the data.

A trained model must stay usable (``predict``, ``export``, ``eval --data`` on another folder)
after its training data has moved or gone, so every checkpoint carries, as entry
:data:`CARD_KEY`, plain JSON-able values (it still loads with ``torch.load(weights_only=True)``
and is covered by the checkpoint's digest)::

    {"version": 1,
     "tasks": [{"name": "semantic", "kind": "segmentation",          # mtpsl.tasks.task_kind
                "params": {"loss_weight": 1.0, "num_classes": 13},   # constructor fields
                "out_channels": 13,
                "class_names": ["bed", ...] | None,   # where the dataset defines them
                "colours": [[0, 0, 0], ...] | None},  # class id -> RGB of predict's PNGs
               ...],                                  # in head order
     "input": {"size": [H, W], "channels": 3, "dtype": "float32", "range": [0.0, 1.0],
               "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}}

``input`` records what the model was trained on: RGB images of ``size`` (the training images'
height and width) as float32 in [0, 1]. No mean/std normalisation happens anywhere between the
dataset and the model (the datasets scale to [0, 1], the models take that as it is), hence the
identity ``mean``/``std``. The architecture, method and their options are the checkpoint's
``config``; :func:`tasks_from_card` and :func:`card_input_size` read the rest back, and
:func:`check_card` refuses a malformed card with a :class:`CheckpointError` naming the file and
the entry.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtpsl.core.errors import CheckpointError, MtpslError
from mtpsl.tasks import TASKS, Task, build_task, task_kind

if TYPE_CHECKING:
    from mtpsl.engine.build import Experiment

__all__ = ["CARD_KEY", "CARD_VERSION", "card_input_size", "check_card", "model_card",
           "tasks_from_card"]

CARD_KEY = "model_card"
CARD_VERSION = 1
INPUT_RANGE = [0.0, 1.0]
"""Pixel range the model takes (the datasets' and ``read_image``'s)."""
INPUT_MEAN = [0.0, 0.0, 0.0]
INPUT_STD = [1.0, 1.0, 1.0]
"""No normalisation is applied between the dataset and the model (see the module docstring)."""


def _plain(value: Any, where: str) -> Any:
    """``value`` as JSON-able Python (tuples become lists); anything else is refused, since a
    checkpoint must load with ``weights_only=True`` and the card must be readable anywhere."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MtpslError(f"{where} is {value}: a model card holds finite numbers only")
        return value
    if isinstance(value, list | tuple):
        return [_plain(v, where) for v in value]
    raise MtpslError(f"{where} is a {type(value).__name__}: a model card holds plain values "
                     "only (None, bool, int, float, str, lists of them)")


def task_entry(task: Task, class_names: Any = None) -> dict[str, Any]:
    """One task's card entry: its registered kind and every constructor field but the name."""
    kind = task_kind(task)
    if kind is None:
        raise MtpslError(f"task {task.name!r} ({type(task).__name__}) is not a registered task "
                         "type, so a checkpoint cannot rebuild it; register it in mtpsl.tasks")
    params = {f.name: _plain(getattr(task, f.name), f"task {task.name!r} field {f.name!r}")
              for f in dataclasses.fields(task) if f.init and f.name != "name"}
    colours = task.prediction_palette()
    return {
        "name": task.name,
        "kind": kind,
        "params": params,
        "out_channels": int(task.out_channels),
        "class_names": None if class_names is None else [str(n) for n in class_names],
        "colours": None if colours is None else colours.astype(int).tolist(),
    }


def model_card(exp: Experiment) -> dict[str, Any]:
    """The card of a run (constant over the run: it may be computed once and reused)."""
    source = exp.train_set.source
    names = source.class_names
    return {
        "version": CARD_VERSION,
        "tasks": [task_entry(task, names.get(name)) for name, task in exp.tasks.items()],
        "input": {"size": [int(source.height), int(source.width)], "channels": 3,
                  "dtype": "float32", "range": list(INPUT_RANGE), "mean": list(INPUT_MEAN),
                  "std": list(INPUT_STD)},
    }


def _fail(path: Path, entry: str, what: str) -> CheckpointError:
    """A malformed card, named by file and entry (``tasks[0].params``; "" for the card)."""
    where = f" {entry}" if entry else ""
    return CheckpointError(f"{path}: checkpoint entry '{CARD_KEY}'{where}: {what}; the model "
                           "cannot be rebuilt from it (retrain, or use another copy)")


def _kind_name(value: Any) -> str:
    return type(value).__name__


def _require(mapping: Mapping, key: str, kind: type | tuple[type, ...], path: Path,
             entry: str) -> Any:
    if key not in mapping:
        raise _fail(path, entry, f"lacks {key!r}")
    value = mapping[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise _fail(path, f"{entry}.{key}", f"is a {_kind_name(value)}")
    return value


def _fits(value: Any, default: Any) -> bool:
    """``value`` has the type of a field's ``default`` (an int where a float is due is fine);
    fields without a plain default (None, required) take any plain value. Task dataclasses do
    not check their field types, so a wrong one would surface only deep inside training."""
    if default is None or default is dataclasses.MISSING:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, int | float)
    if isinstance(default, int | str):
        return type(value) is type(default)
    if isinstance(default, tuple | list):
        return isinstance(value, list | tuple)
    return True


def _tuples(value: Any) -> Any:
    """Lists back to tuples: task fields are frozen (hashable) values."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _task_of(entry: Any, index: int, path: Path) -> Task:
    where = f"tasks[{index}]"
    if not isinstance(entry, dict):
        raise _fail(path, where, f"is a {_kind_name(entry)}")
    name = _require(entry, "name", str, path, where)
    where = f"tasks[{index}] ({name!r})"
    kind = _require(entry, "kind", str, path, where)
    params = _require(entry, "params", dict, path, where)
    if kind not in TASKS.names():
        raise CheckpointError(f"{path}: checkpoint entry '{CARD_KEY}' {where}: task type "
                              f"{kind!r} is not registered in this mtpsl (task types: "
                              f"{', '.join(TASKS.names())}); install the plugin that defines it")
    if "name" in params or not all(isinstance(k, str) for k in params):
        raise _fail(path, f"{where}.params", "holds 'name' or a non-string key")
    defaults = {f.name: f.default for f in dataclasses.fields(TASKS.get(kind))}
    for key, value in params.items():
        if key in defaults and not _fits(value, defaults[key]):
            raise _fail(path, f"{where}.params.{key}",
                        f"is {value!r}, not a value like its default {defaults[key]!r}")
    try:
        task = build_task(kind, name, **{k: _tuples(v) for k, v in params.items()})
    except (TypeError, ValueError) as err:
        raise _fail(path, f"{where}.params", f"do not build a {kind} task ({err})") from None
    channels = _require(entry, "out_channels", int, path, where)
    if channels != task.out_channels:
        raise _fail(path, f"{where}.out_channels",
                    f"{channels}, but its params give {task.out_channels}")
    for key in ("class_names", "colours"):
        value = entry.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or len(value) != task.out_channels:
            raise _fail(path, f"{where}.{key}", f"must be a list of {task.out_channels}")
    names = entry.get("class_names")
    if names is not None and not all(isinstance(n, str) for n in names):
        raise _fail(path, f"{where}.class_names", "must hold strings")
    colours = entry.get("colours")
    if colours is not None and not all(
            isinstance(c, list) and len(c) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in c)
            for c in colours):
        raise _fail(path, f"{where}.colours", "must hold [r, g, b] integers in 0..255")
    return task


def tasks_from_card(card: Any, path: Path) -> dict[str, Task]:
    """The tasks recorded in ``card`` (in head order), built from their registered kinds."""
    if not isinstance(card, dict):
        raise _fail(path, "", f"is a {_kind_name(card)}")
    version = card.get("version")
    if version != CARD_VERSION:
        raise CheckpointError(f"{path}: checkpoint entry '{CARD_KEY}' has version {version!r}, "
                              f"but this mtpsl reads version {CARD_VERSION} (a newer mtpsl "
                              "wrote it? upgrade to read it)")
    entries = _require(card, "tasks", list, path, "")
    if not entries:
        raise _fail(path, "tasks", "is empty")
    tasks: dict[str, Task] = {}
    for index, entry in enumerate(entries):
        task = _task_of(entry, index, path)
        if task.name in tasks:
            raise _fail(path, f"tasks[{index}]", f"names task {task.name!r} twice")
        tasks[task.name] = task
    return tasks


def card_input_size(card: Any, path: Path) -> tuple[int, int]:
    """(H, W) of the training images recorded in ``card``."""
    if not isinstance(card, dict):
        raise _fail(path, "", f"is a {_kind_name(card)}")
    info = _require(card, "input", dict, path, "")
    size = _require(info, "size", list, path, "input")
    if len(size) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        raise _fail(path, "input.size", f"must be [height, width] of positive integers, "
                                         f"got {size!r}")
    return (size[0], size[1])


def check_card(card: Any, path: Path, task_names: Any = None) -> None:
    """Refuse a malformed card (every entry is read back as :func:`load_run` reads it); with
    ``task_names`` (the checkpoint's), the card's tasks must be those, in that order."""
    tasks = tasks_from_card(card, path)
    card_input_size(card, path)
    if task_names is not None and list(tasks) != list(task_names):
        raise _fail(path, "tasks", f"are {list(tasks)}, but the checkpoint's task_names are "
                                   f"{list(task_names)}")
