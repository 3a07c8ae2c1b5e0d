"""A method's teacher: the trained run it learns from (``hitts`` stage 2), loaded into the
module the method built for it when a run starts (:func:`mtpsl.engine.run.train`; a resumed
run restores the teacher from its own checkpoint, with the rest of the method's state).

Kept apart from :mod:`mtpsl.engine.build` because it reads checkpoints, whose module card
refers back to the build step.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mtpsl.core.config import Config, build_config, trained_model
from mtpsl.core.errors import ConfigError
from mtpsl.engine.checkpoint import (
    CHECKPOINT,
    load_checkpoint,
    load_module_state,
    require_finite,
)
from mtpsl.methods import Method
from mtpsl.tasks import Task


def load_teacher(method: Method, config: Config, tasks: Mapping[str, Task]) -> None:
    """Load the trained run a method learns from (:meth:`Method.teacher_source`, e.g.
    ``hitts`` stage 2) into the module the method built for it (a new run only: a resumed
    one restores it with the method's state): the run's checkpoint,
    verified (:func:`load_checkpoint`), must hold finite weights of the same tasks and the
    same ``model`` config (its backbone's weights file aside); a run folder must hold a
    finished run (a grid may start a student before its teacher ends)."""
    source = method.teacher_source()
    if source is None:
        return
    where, module = source
    path = Path(where) / CHECKPOINT if Path(where).is_dir() else Path(where)
    if Path(where).is_dir() and not (Path(where) / "final_metrics.json").exists():
        raise ConfigError(f"method.options.teacher: the run in {where} has not finished (no "
                          "final_metrics.json); train it to the end first, or name one of "
                          "its checkpoint files to use it as it is")
    if not path.is_file():
        raise ConfigError(f"method.options.teacher: {where} is neither a run folder holding "
                          f"{CHECKPOINT} nor a checkpoint file")
    state = load_checkpoint(path)
    require_finite(state["model"].items(), path, "the teacher model")
    if list(state["task_names"]) != list(tasks):
        raise ConfigError(f"method.options.teacher: {path} was trained on tasks "
                          f"{state['task_names']}, this run has {list(tasks)}")
    teacher_config = build_config(dict(state["config"]), str(path))  # keys added since: defaults
    theirs, ours = teacher_config.model.model_dump(), config.model.model_dump()
    for side in (theirs, ours):
        side["backbone"] = {**side.get("backbone", {}), "weights": None}
    if theirs != ours:
        raise ConfigError(f"method.options.teacher: {path} has another model config "
                          f"({theirs}) than this run ({ours})")
    (their_network, _), (our_network, key) = trained_model(teacher_config), trained_model(config)
    if their_network != our_network:
        raise ConfigError(f"method.options.teacher: {path} trained the {their_network!r} "
                          f"network, this run trains {our_network!r} ({key})")
    load_module_state(module, state["model"], path, "the teacher model")
