"""A trained run as a Python object: ``mtpsl.load_run(path).predict(image)``.

The command line's ``predict`` writes files; this is the same prediction for a notebook or a
service: an image (a path, or an ``(H, W, 3)`` array in [0, 1] or 0-255) in, one finished
array per task out (class ids, metres, unit normals, probabilities), at the image's own size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mtpsl.core.config import Config
from mtpsl.core.errors import DataError
from mtpsl.engine.build import resolve_device
from mtpsl.inference import load
from mtpsl.inference.predict import Predictor
from mtpsl.tasks import Task

Image = str | Path | np.ndarray
"""An image file, or its pixels as an ``(H, W, 3)`` array."""


@dataclass
class TrainedRun:
    """A run's model in eval mode, with its tasks and config, ready to predict."""

    loaded: load.LoadedRun
    device: torch.device

    @property
    def config(self) -> Config:
        return self.loaded.config

    @property
    def tasks(self) -> dict[str, Task]:
        return self.loaded.tasks

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) the model was trained at; other sizes are resized to it and back."""
        return self.loaded.input_size

    def predict(self, image: Image, mode: str = "resize") -> dict[str, np.ndarray]:
        """Every task's finished prediction for one image (``mode="tile"``: tiles of the
        training size over the full-resolution image instead of one resize)."""
        return self.predict_many([image], mode=mode)[0]

    def predict_many(self, images: Sequence[Image], mode: str = "resize",
                     batch_size: int = 8) -> list[dict[str, np.ndarray]]:
        """:meth:`predict` for several images, batched."""
        predictor = Predictor(self.model, self.tasks, self.input_size, self.device,
                              batch_size, mode)
        return predictor.predict([_pixels(image) for image in images])


def load_run(run: str | Path | None = None, checkpoint: str | Path | None = None,
             device: str = "auto") -> TrainedRun:
    """A finished (or checkpointed) run by its folder or checkpoint file; needs no dataset
    (the checkpoint's model card holds the tasks)."""
    dev = resolve_device(device)
    return TrainedRun(load.load_run(run, checkpoint, device=dev), dev)


def _pixels(image: Image) -> np.ndarray:
    """float32 RGB in [0, 1]: files as ``predict`` reads them; uint8/uint16 arrays scaled by
    their type's range; float arrays taken as they are (they must lie in [0, 1])."""
    if isinstance(image, str | Path):
        return load.read_image(image)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise DataError(f"an image array must be (H, W, 3), got shape {array.shape}")
    if np.issubdtype(array.dtype, np.integer):
        return (array / float(np.iinfo(array.dtype).max)).astype(np.float32)
    array = array.astype(np.float32)
    if not (np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0):
        raise DataError("a float image array must hold finite values in [0, 1] (integer "
                        "arrays are scaled by their type's range)")
    return array
