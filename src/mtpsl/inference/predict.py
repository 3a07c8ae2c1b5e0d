"""Run a trained model on ordinary image files of any size and write viewable predictions.

Two ways to bring an image of arbitrary size to the network:

* ``resize`` (default): resize to the run's training size (bilinear, antialiased), predict,
  and map each prediction back to the original size (segmentation: log-probabilities resized
  bilinearly, then argmax; depth bilinear; normals bilinear, then re-normalised).
* ``tile``: cover the image with overlapping tiles of the training size (an image smaller
  than a tile is padded by reflection first), predict every tile and average the overlaps
  (log-probabilities, depth, normals re-normalised afterwards).

Binary tasks (saliency, edges: sigmoid probabilities) are resized bilinearly / averaged
over tiles as probabilities.

Outputs per image stem and task, written by the task's ``save_prediction``: segmentation
(semantic, parts) ``<stem>_<task>.png`` (palette colours) and ``<stem>_<task>_index.png``
(class ids); depth ``<stem>_<task>.png`` (magma), ``.npy`` (float32 metres) and
``_16bit.png`` (uint16 mm); normals ``<stem>_<task>.png`` ((n+1)/2*255) and ``.npy``
(float32 H,W,3); binary tasks ``<stem>_<task>.png`` (8-bit grey probability,
``round(255 p)``, so ``png / 255`` is within 1/510 of ``p``) and ``.npy`` (float32 H,W
probabilities); a task type that defines no files of its own ``<stem>_<task>.npy`` (float32
H,W,C).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from mtpsl.core.errors import DataError, MtpslError
from mtpsl.core.render import (  # noqa: F401  (re-exported: the writers' encodings)
    DEPTH_PERCENTILES,
    OutputFiles,
    colourise_depth,
    depth_to_mm16,
    probability_to_u8,
    voc_colours,
)
from mtpsl.inference.load import LoadedRun, read_image
from mtpsl.tasks import Task

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MODES = ("resize", "tile")
TILE_OVERLAP = 0.5
"""Fraction of a tile shared with its neighbour (the stride is at most half a tile)."""


# ----------------------------------------------------------------------------- inputs


def collect_images(paths: Iterable[str | Path]) -> list[Path]:
    """Files given directly plus the PNG/JPEG files of given folders (sorted, any case).

    Raises DataError for a missing path, a folder without images, or two inputs whose
    outputs would collide (same file stem).
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            images = sorted(p for p in path.iterdir()
                            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise DataError(f"folder {path} has no PNG/JPEG images")
            found.extend(images)
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(f"image {path} does not exist")
    if not found:
        raise DataError("no input images given")
    seen: dict[str, Path] = {}
    for path in found:
        if path.stem in seen and seen[path.stem] != path:
            raise DataError(f"images {seen[path.stem]} and {path} would write the same "
                            f"outputs (stem {path.stem!r}); predict them into separate folders")
        seen[path.stem] = path
    return list(dict.fromkeys(found))


# ----------------------------------------------------------------------------- prediction


def tile_starts(length: int, tile: int, overlap: float = TILE_OVERLAP) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)`` (length >= tile),
    evenly spread, neighbours overlapping by at least ``overlap`` of a tile."""
    if length <= tile:
        return [0]
    stride = max(1, int(tile * (1.0 - overlap)))
    n = math.ceil((length - tile) / stride) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def reflect_pad(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pad (H,W,3) at the bottom/right by reflection up to at least ``height x width``."""
    pads = [(0, max(0, height - image.shape[0])), (0, max(0, width - image.shape[1])), (0, 0)]
    if not any(p[1] for p in pads):
        return image
    # numpy's reflect repeats the reflection for pads longer than the image; a 1-pixel side
    # has nothing to reflect, so it is repeated.
    for axis in (0, 1):
        if pads[axis][1]:
            axis_pads = [(0, 0)] * 3
            axis_pads[axis] = pads[axis]
            if image.shape[axis] > 1:
                image = np.pad(image, axis_pads, mode="reflect")
            else:
                image = np.pad(image, axis_pads, mode="edge")
    return image


class Predictor:
    """Batched full-resolution prediction with a loaded run (see the module docstring)."""

    def __init__(self, model: nn.Module, tasks: dict[str, Task], input_size: tuple[int, int],
                 device: torch.device, batch_size: int = 8, mode: str = "resize") -> None:
        if mode not in MODES:
            raise MtpslError(f"unknown mode {mode!r}; modes: {list(MODES)}")
        if batch_size < 1:
            raise MtpslError(f"batch size must be at least 1, got {batch_size}")
        self.model = model.eval()
        self.tasks = tasks
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.device = device
        self.batch_size = batch_size
        self.mode = mode

    @torch.no_grad()
    def _run(self, batch: Tensor) -> dict[str, Tensor]:
        """Activated predictions for a batch at input size, in float32."""
        preds = self.model(batch.to(self.device, torch.float32)).preds
        return {name: preds[name].float() for name in self.tasks}

    def predict(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Final per-task arrays for each (H,W,3) float image (see :func:`finalise`)."""
        if self.mode == "resize":
            maps = self._resize_mode(images)
        else:
            maps = [self._tile_mode(image) for image in images]
        return [{name: finalise(self.tasks[name], m[name]) for name in self.tasks} for m in maps]

    def _resize_mode(self, images: Sequence[np.ndarray]) -> list[dict[str, Tensor]]:
        """Images may differ in size: each is resized to the input size, then all are batched."""
        out: list[dict[str, Tensor]] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            batch = torch.stack([resize(_to_tensor(img, self.device), self.input_size)
                                 for img in chunk])
            preds = self._run(batch)
            for i, img in enumerate(chunk):
                size = img.shape[:2]
                out.append({name: resize(p[i], size) for name, p in preds.items()})
        return out

    def _tile_mode(self, image: np.ndarray) -> dict[str, Tensor]:
        th, tw = self.input_size
        h, w = image.shape[:2]
        padded = _to_tensor(reflect_pad(image, th, tw), self.device)
        ph, pw = padded.shape[-2:]
        boxes = [(y, x) for y in tile_starts(ph, th) for x in tile_starts(pw, tw)]
        sums: dict[str, Tensor] = {}
        count = torch.zeros((1, ph, pw), device=self.device)
        for start in range(0, len(boxes), self.batch_size):
            chunk = boxes[start:start + self.batch_size]
            preds = self._run(torch.stack([padded[:, y:y + th, x:x + tw] for y, x in chunk]))
            for name, p in preds.items():
                acc = sums.setdefault(name, p.new_zeros((p.shape[1], ph, pw)))
                for i, (y, x) in enumerate(chunk):
                    acc[:, y:y + th, x:x + tw] += p[i]
            for y, x in chunk:
                count[:, y:y + th, x:x + tw] += 1
        return {name: (acc / count)[:, :h, :w] for name, acc in sums.items()}


def _to_tensor(image: np.ndarray, device: torch.device) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1).float()


def resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear, antialiased resize of one ``[C,H,W]`` map (a no-op at the same size)."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False,
                         antialias=True)[0]


def finalise(task: Task, pred: Tensor) -> np.ndarray:
    """A full-size ``[C,H,W]`` activated prediction as the array that gets written (the
    task's :meth:`~mtpsl.tasks.Task.finalise`)."""
    return task.finalise(pred)


# ----------------------------------------------------------------------------- outputs


def palette(n: int = 256) -> np.ndarray:
    """The fixed PASCAL VOC colour of every class id, (n,3) uint8 (id 0 black)."""
    return voc_colours(n)


def write_outputs(out_dir: Path, stem: str, tasks: dict[str, Task],
                  arrays: dict[str, np.ndarray]) -> list[Path]:
    """Write every task's files for one image (each task's ``save_prediction``); return
    their paths."""
    files = OutputFiles(out_dir, stem)
    for name, task in tasks.items():
        task.save_prediction(arrays[name], files)
    return files.written


# ----------------------------------------------------------------------------- entry point


def run_input_size(loaded: LoadedRun) -> tuple[int, int]:
    """(H, W) the run was trained at (:func:`~mtpsl.inference.load.load_run` reads it from the
    checkpoint; only checkpoints older than the model card take it from the dataset)."""
    return (int(loaded.input_size[0]), int(loaded.input_size[1]))


def predict_files(
    run: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    device: str = "auto",
    batch_size: int = 8,
    mode: str = "resize",
    root: str | None = None,
    progress: bool | None = None,
) -> list[Path]:
    """``mtpsl predict``: predict every input image with the run's model; return written files.

    ``progress=None`` shows the bar only on a terminal.
    """
    from mtpsl.engine.build import resolve_device
    from mtpsl.inference.load import load_run

    if mode not in MODES:
        raise MtpslError(f"unknown mode {mode!r}; modes: {list(MODES)}")
    files = collect_images(inputs)
    dev = resolve_device(device)
    loaded = load_run(run, root=root, device=dev)
    predictor = Predictor(loaded.model, loaded.tasks, run_input_size(loaded), dev, batch_size,
                          mode)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Resize mode batches across images; tile mode batches the tiles of one image.
    group = batch_size if mode == "resize" else 1
    written: list[Path] = []
    bar = tqdm(total=len(files), desc="predict", unit="img",
               disable=None if progress is None else not progress)
    with bar:
        for start in range(0, len(files), group):
            chunk = files[start:start + group]
            images = [read_image(path) for path in chunk]
            for path, arrays in zip(chunk, predictor.predict(images), strict=True):
                written.extend(write_outputs(out_dir, path.stem, loaded.tasks, arrays))
                bar.update(1)
    return written
