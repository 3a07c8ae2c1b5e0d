"""Loading trained runs and ordinary images for inference (eval, predict, export, figures)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import load_checkpoint
from .config import Config, build_config
from .errors import DataError
from .experiment import build_model_for, open_dataset
from .methods import build_method
from .methods.base import Method
from .tasks import Task


@dataclass
class LoadedRun:
    """A trained model rebuilt from its checkpoint, with what is needed to use it."""

    config: Config
    tasks: dict[str, Task]
    model: nn.Module
    epoch: int
    checkpoint: Path
    input_size: tuple[int, int] | None
    """(H, W) of the training images, if the checkpoint records it."""


def checkpoint_path(run: str | Path | None, checkpoint: str | Path | None) -> Path:
    if (run is None) == (checkpoint is None):
        raise DataError("give exactly one of a run folder or a checkpoint file")
    return Path(checkpoint) if checkpoint else Path(run) / "checkpoint.pt"


def load_run(
    run: str | Path | None = None,
    checkpoint: str | Path | None = None,
    root: str | None = None,
    device: torch.device | str = "cpu",
) -> LoadedRun:
    """Rebuild the model of a run (in eval mode, on ``device``) from its checkpoint.

    The task definitions come from the run's dataset (``root`` may point to another copy of
    the same layout); the checkpoint alone is enough when it records them.
    """
    path = checkpoint_path(run, checkpoint)
    state = load_checkpoint(path)
    config = build_config(state["config"], str(path))
    if root:
        config.dataset.root = root
    tasks = dict(open_dataset(config, config.dataset.eval_split).tasks)
    method = build_method(config.method.name, tasks, config.method.options)
    model = build_model_for(config, tasks, method)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    size = state.get("input_size")
    return LoadedRun(config, tasks, model, int(state["epoch"]), path,
                     tuple(size) if size is not None else None)


def load_method(run: LoadedRun) -> Method:
    """Rebuild the trained method of a loaded run (its auxiliary networks, e.g. the ``xtc``
    mapping network) from the run's checkpoint, in eval mode on the model's device.

    ``build_method`` + ``attach(run.model)`` + ``load_state_dict`` of the checkpoint's
    ``"method"`` entry: the same steps training takes before it resumes.
    """
    state = load_checkpoint(run.checkpoint)
    if "method" not in state:
        raise DataError(f"checkpoint {run.checkpoint} holds no method state")
    config = run.config
    method = build_method(config.method.name, run.tasks, config.method.options)
    method.attach(run.model)
    method.load_state_dict(state["method"])
    device = next(run.model.parameters()).device
    return method.to(device).eval()


def read_image(path: str | Path) -> np.ndarray:
    """An RGB image file (PNG, JPEG, ...) as float32 (H, W, 3) in [0, 1].

    Raises DataError naming the file when it is missing, not an image, or corrupt.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"image {path} does not exist")
    try:
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError,
            SyntaxError) as err:  # a bomb: a crafted header declaring billions of pixels
        raise DataError(f"image {path} cannot be read as an image: {err}") from None
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise DataError(f"image {path} has an unusable shape {array.shape}")
    return array
