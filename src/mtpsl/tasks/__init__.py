"""Tasks. Every module of this package is imported here, so each registers its task types in
``TASKS``: adding a task type is adding a file (see ``docs/extending.md``)."""

from ..registry import discover
from .base import TASKS, Interpolation, Task, broadcast_scale, build_task, task_kind
from .binary import BinaryTask, EdgeTask, SaliencyTask
from .depth import DepthTask
from .normal import NormalTask
from .segmentation import SegmentationTask

discover(__name__, __path__)

__all__ = [
    "TASKS",
    "BinaryTask",
    "DepthTask",
    "EdgeTask",
    "Interpolation",
    "NormalTask",
    "SaliencyTask",
    "SegmentationTask",
    "Task",
    "broadcast_scale",
    "build_task",
    "task_kind",
]
