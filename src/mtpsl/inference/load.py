"""Loading trained runs and ordinary images for inference (eval, predict, export, figures)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mtpsl.core.config import Config, build_config
from mtpsl.core.errors import CheckpointError, DataError, NonFiniteResultError
from mtpsl.engine.build import build_model_for, open_dataset
from mtpsl.engine.card import CARD_KEY, card_input_size, tasks_from_card
from mtpsl.engine.checkpoint import load_checkpoint, load_module_state, require_finite
from mtpsl.methods import build_method
from mtpsl.methods.base import Method
from mtpsl.tasks import Task


@dataclass
class LoadedRun:
    """A trained model rebuilt from its checkpoint, with what is needed to use it."""

    config: Config
    tasks: dict[str, Task]
    model: nn.Module
    epoch: int
    checkpoint: Path
    input_size: tuple[int, int]
    """(H, W) of the training images."""
    card: dict | None = None
    """The checkpoint's model card (:mod:`mtpsl.engine.card`); None in checkpoints older than
    it, whose tasks came from the dataset."""


def checkpoint_path(run: str | Path | None, checkpoint: str | Path | None) -> Path:
    if (run is None) == (checkpoint is None):
        raise DataError("give exactly one of a run folder or a checkpoint file")
    if checkpoint is not None:
        return Path(checkpoint)
    assert run is not None  # exactly one was given
    return Path(run) / "checkpoint.pt"


def load_run(
    run: str | Path | None = None,
    checkpoint: str | Path | None = None,
    root: str | None = None,
    device: torch.device | str = "cpu",
) -> LoadedRun:
    """Rebuild the model of a run (in eval mode, on ``device``) from its checkpoint.

    The tasks and the input size come from the checkpoint's model card, so no dataset is
    opened. A checkpoint older than the card takes them from the run's dataset instead
    (``root`` may point to another copy of the same layout; ``config.dataset.root`` becomes
    ``root`` either way).
    """
    path = checkpoint_path(run, checkpoint)
    state = load_checkpoint(path)
    require_finite(state["model"].items(), path, "the model")
    config = build_config(state["config"], str(path))
    if root:
        config.dataset.root = root
    card = state.get(CARD_KEY)
    if card is not None:
        tasks = tasks_from_card(card, path)
        size = card_input_size(card, path)
    else:
        tasks, size = _from_dataset(config, state, path)
    method = build_method(config.method.name, tasks, config.method.options)
    model = build_model_for(_without_weight_files(config), tasks, method)
    load_module_state(model, state["model"], path, "the model")
    model.to(device).eval()
    return LoadedRun(config, tasks, model, int(state["epoch"]), path, size, card)


def require_finite_outputs(preds: Mapping[str, torch.Tensor | np.ndarray], what: str) -> None:
    """Refuse to serve ``preds`` (task -> outputs) holding NaN/inf: finite weights can still
    give them (a run diverged to huge weights), and a NaN array written as a prediction looks
    like a result. Raises :class:`~mtpsl.core.errors.NonFiniteResultError` naming ``what``
    (e.g. the image and the checkpoint) and the tasks."""
    bad = []
    for name, value in preds.items():
        finite = (bool(torch.isfinite(value).all()) if isinstance(value, torch.Tensor)
                  else bool(np.isfinite(np.asarray(value)).all()))
        if not finite:
            bad.append(name)
    if bad:
        found = [f"{name} (predictions NaN/inf)" for name in bad]
        raise NonFiniteResultError(
            f"{what}: the model's outputs for {', '.join(bad)} are non-finite (NaN/inf); the "
            "run diverged in training and its outputs are not served", found)


def _from_dataset(config: Config, state: dict, path: Path) -> tuple[dict[str, Task],
                                                                     tuple[int, int]]:
    """Tasks and input size of a checkpoint without a model card, from the run's dataset."""
    try:
        dataset = open_dataset(config, config.dataset.eval_split)
    except DataError as err:
        raise CheckpointError(
            f"{path}: checkpoint has no '{CARD_KEY}' (written by an older mtpsl), so its task "
            f"definitions must come from its {config.dataset.name} dataset, which cannot be "
            f"opened ({err}); pass --data DIR (or --root DIR) pointing at a copy of that "
            "dataset's layout"
        ) from None
    size = state.get("input_size") or (dataset.height, dataset.width)
    return dict(dataset.tasks), (int(size[0]), int(size[1]))


def _without_weight_files(config: Config) -> Config:
    """``config`` without a pretrained backbone file: the checkpoint's weights replace it, so
    inference must not need (or read) that file."""
    if config.model.backbone.weights is None:
        return config
    config = config.model_copy(deep=True)
    config.model.backbone.weights = None
    return config


def load_method(run: LoadedRun) -> Method:
    """Rebuild the trained method of a loaded run (its auxiliary networks, e.g. the ``xtc``
    mapping network) from the run's checkpoint, in eval mode on the model's device.

    ``build_method`` + ``attach(run.model)`` + ``load_state_dict`` of the checkpoint's
    ``"method"`` entry: the same steps training takes before it resumes.
    """
    config = run.config
    method = build_method(config.method.name, run.tasks, config.method.options)
    method.attach(run.model)
    if method.state_dict():  # a method without state (sl, stl) needs no checkpoint entry
        state = load_checkpoint(run.checkpoint, required={"method": dict})
        require_finite(state["method"].items(), run.checkpoint, "the method")
        load_module_state(method, state["method"], run.checkpoint, "the method")
    device = next(run.model.parameters()).device
    return method.to(device).eval()


def read_image(path: str | Path) -> np.ndarray:
    """An image file (PNG, JPEG, TIFF, ...) as float32 RGB (H, W, 3) in [0, 1], as a person
    sees it: EXIF orientation applied; 16-bit and 32-bit images scaled by the range of their
    type (not clipped to 8 bits); greyscale repeated to RGB; palette, CMYK and alpha images
    converted (alpha dropped).

    Raises DataError naming the file when it is missing, not an image, corrupt, or empty.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"image {path} does not exist")
    try:
        with Image.open(path) as img:
            img.load()
            array = _to_rgb_float(ImageOps.exif_transpose(img))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError,
            SyntaxError) as err:  # a bomb: a crafted header declaring billions of pixels
        raise DataError(f"image {path} cannot be read as an image: {err}") from None
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise DataError(f"image {path} has an unusable shape {array.shape}")
    if not np.isfinite(array).all():
        raise DataError(f"image {path} holds NaN or infinite pixel values")
    return array


_HIGH_DEPTH = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0,
               "I": 2.0**32 - 1}
"""Integer modes of more than 8 bits and the full range of their type."""


def _to_rgb_float(img) -> np.ndarray:
    """RGB float32 in [0, 1] from any PIL mode, without losing bits on the way."""
    mode = img.mode
    if mode in _HIGH_DEPTH or mode == "F":
        values = np.asarray(img, dtype=np.float64)
        if mode == "F":  # float images: taken as [0, 1] if they are, else min-max scaled
            low, high = float(np.nanmin(values)), float(np.nanmax(values))
            if low < 0.0 or high > 1.0:
                values = (values - low) / (high - low) if high > low else values * 0.0
        elif mode == "I" and values.min() >= 0 and values.max() <= 65535:
            values = values / 65535.0  # 16-bit PNGs often decode as mode I
        else:
            values = values / _HIGH_DEPTH[mode]
        grey = np.clip(values, 0.0, 1.0).astype(np.float32)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in ("P", "PA"):
        img = img.convert("RGBA")
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
