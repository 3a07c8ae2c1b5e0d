"""Tasks. Every module of this package is imported here, so each registers its task types in
``TASKS``: adding a task type is adding a file (see ``docs/extending.md``)."""

from mtpsl.core.registry import discover
from mtpsl.tasks.base import TASKS, Interpolation, Task, broadcast_scale, build_task, task_kind
from mtpsl.tasks.binary import BinaryTask, EdgeTask, SaliencyTask
from mtpsl.tasks.depth import DepthTask
from mtpsl.tasks.normal import NormalTask
from mtpsl.tasks.segmentation import SegmentationTask

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
