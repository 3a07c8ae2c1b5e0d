"""Run a trained model on ordinary image files of any size and write viewable predictions.

Two ways to bring an image of arbitrary size to the network:

* ``resize`` (default): resize to the run's training size (bilinear, antialiased), predict,
  and map each prediction back to the original size (segmentation: log-probabilities resized
  bilinearly, then argmax; depth bilinear; normals bilinear, then re-normalised).
* ``tile``: cover the image with overlapping tiles of the training size (an image smaller
  than a tile is padded by reflection first), predict every tile and blend the overlaps
  with a window (:func:`tile_window`: a tile's weight falls linearly from its centre to
  nearly 0 at its border, so no tile edge shows as a seam; log-probabilities, depth,
  normals re-normalised afterwards).

Binary tasks (saliency, edges: sigmoid probabilities) are resized bilinearly / averaged
over tiles as probabilities.

Inputs: files given by name are predicted as they are. A folder is searched (not
recursively) for ``*.png``, ``*.jpg`` and ``*.jpeg`` (any case), leaving out what looks like
the labels or outputs of its images (:func:`derived_files`): a file ``<stem>_<anything>``
beside an image ``<stem>`` (``a_label.png``, ``a_depth.png`` beside ``a.jpg``: ground truth
kept next to its image, or ``mtpsl predict``'s own outputs) and any ``*_index.png``,
``*_16bit.png`` or ``*_panel.png``. ``globs`` (``--glob``) names the image files of a folder
instead, and then nothing is left out.

Outputs per image stem and task, written by the task's ``save_prediction`` in the colours
of :mod:`mtpsl.core.palette` (the ones the figures use): segmentation (semantic, parts)
``<stem>_<task>.png`` (the run's class colours, from its model card) and
``<stem>_<task>_index.png`` (class ids); depth ``<stem>_<task>.png`` (viridis over the
image's 2-98 percentile range), ``.npy`` (float32 metres) and
``_16bit.png`` (uint16 mm); normals ``<stem>_<task>.png`` ((n+1)/2*255) and ``.npy``
(float32 H,W,3); binary tasks ``<stem>_<task>.png`` (8-bit grey probability,
``round(255 p)``, so ``png / 255`` is within 1/510 of ``p``) and ``.npy`` (float32 H,W
probabilities); a task type that defines no files of its own ``<stem>_<task>.npy`` (float32
H,W,C). With ``panel`` (``--panel``) also ``<stem>_panel.png``: the input beside every
task's picture, with a key below each (class names and colours, the depth colour bar in
metres, the normals' colour disc, the probability scale).

Memory: every output is written at the image's own size, so an image costs memory in
proportion to its pixels (about :func:`bytes_per_pixel`: the decoded image, each task's
full-size prediction and its files; ~150-180 B a pixel for the demo's three tasks, ~16 GiB
for a 10000x10000 image). Each input's size is read from its header before anything is decoded or
predicted, and an image above ``max_megapixels`` (``--max-megapixels``, default
:data:`MAX_MEGAPIXELS`) is refused, naming its size, the limit and the memory it would need;
resize mode batches images only up to that many pixels together.
"""

from __future__ import annotations

import fnmatch
import math
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from mtpsl.core.errors import DataError, MtpslError
from mtpsl.core.files import encoded, write_all
from mtpsl.core.palette import default_class_colours
from mtpsl.core.render import (  # noqa: F401  (re-exported: the writers' encodings)
    DEPTH_PERCENTILES,
    Cell,
    OutputFiles,
    colourise_depth,
    depth_to_mm16,
    probability_to_u8,
    voc_colours,
)
from mtpsl.inference.load import LoadedRun, read_image, require_finite_outputs
from mtpsl.tasks import Task

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MODES = ("resize", "tile")
TILE_OVERLAP = 0.5
"""Fraction of a tile shared with its neighbour (the stride is at most half a tile)."""
MAX_MEGAPIXELS = 40.0
"""Default limit on an input's size (a 48 MP phone photo needs ``--max-megapixels 50``): at
the demo's tasks about 6 GB; above it, predictions are refused instead of exhausting memory."""


# ----------------------------------------------------------------------------- inputs


OUTPUT_SUFFIXES = ("_index", "_16bit", "_panel")
"""Stem endings of files ``mtpsl predict`` writes that are never inputs in a folder scan."""


def derived_files(files: Sequence[Path]) -> list[Path]:
    """Those of ``files`` (one folder's images) that look like labels or outputs of another
    image: a stem ``<image stem>_...`` beside that image, or a stem ending in one of
    :data:`OUTPUT_SUFFIXES`."""
    stems = {p.stem for p in files}
    out = []
    for path in files:
        parts = path.stem.split("_")
        prefixes = {"_".join(parts[:k]) for k in range(1, len(parts))}
        if prefixes & stems or path.stem.endswith(OUTPUT_SUFFIXES):
            out.append(path)
    return out


def _matches(path: Path, globs: Sequence[str]) -> bool:
    name = path.name.lower()
    return any(fnmatch.fnmatch(name, g.lower()) for g in globs)


def collect_images(paths: Iterable[str | Path], globs: Sequence[str] | None = None,
                   skipped: list[Path] | None = None) -> list[Path]:
    """Files given directly plus the images of given folders (sorted; see the module
    docstring for which files of a folder are images). Files a folder scan leaves out are
    appended to ``skipped`` where given.

    Raises DataError for a missing path, a folder without images, or two inputs whose
    outputs would collide (same file stem).
    """
    patterns = list(globs) if globs else [f"*{s}" for s in IMAGE_SUFFIXES]
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if p.is_file() and _matches(p, patterns))
            derived = [] if globs else derived_files(images)
            if skipped is not None:
                skipped.extend(derived)
            images = [p for p in images if p not in derived]
            if not images:
                what = " or ".join(patterns)
                raise DataError(f"folder {path} has no images ({what})"
                                + (f"; {len(derived)} files look like labels or outputs of "
                                   f"other images (pass --glob to name the images)"
                                   if derived else ""))
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


# ----------------------------------------------------------------------------- memory


def bytes_per_pixel(tasks: Mapping[str, Task]) -> float:
    """A rough estimate of predict's peak memory per input pixel: the decoded image and its
    copies (~40 B) and ~8 B per output channel (the full-size float32 prediction, then its
    finalised array and encoded files; measured: ~150 B for the demo's 17 channels)."""
    return 40.0 + 8.0 * sum(int(task.out_channels) for task in tasks.values())


@contextmanager
def pil_pixel_limit(pixels: float | None) -> Iterator[None]:
    """PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) raised to ``pixels``
    (None: lifted) for the block, its warning silenced: predict applies its own limit, named
    after its option, before decoding, and PIL's must not refuse below it."""
    from PIL import Image

    before = Image.MAX_IMAGE_PIXELS
    if pixels is None or before is None:
        Image.MAX_IMAGE_PIXELS = None
    else:
        Image.MAX_IMAGE_PIXELS = max(before, int(pixels))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file from its header alone (nothing is decoded), as it is shown
    (EXIF orientation applied)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with pil_pixel_limit(None), Image.open(path) as img:
            width, height = img.size
            orientation = img.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(f"image {path} cannot be read as an image: {err}") from None
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def check_sizes(files: Sequence[Path], tasks: Mapping[str, Task],
                max_megapixels: float) -> list[tuple[int, int]]:
    """Every file's (H, W) from its header; DataError naming the first one above
    ``max_megapixels``, its size, the limit's option and the memory it would take."""
    if not (math.isfinite(max_megapixels) and max_megapixels > 0):
        raise MtpslError(f"--max-megapixels must be a positive number, got {max_megapixels}")
    sizes = [image_size(path) for path in files]
    per_pixel = bytes_per_pixel(tasks)
    for path, (h, w) in zip(files, sizes, strict=True):
        if h * w > max_megapixels * 1e6:
            raise DataError(
                f"image {path} is {w}x{h} ({h * w / 1e6:.4g} MP), above predict's limit of "
                f"{max_megapixels:g} MP (--max-megapixels): predicting it at full "
                f"resolution needs about {h * w * per_pixel / 2**30:.1f} GiB of memory for "
                f"this run's {len(tasks)} tasks; raise --max-megapixels if this machine has "
                f"it, or downscale the image first")
    return sizes


@contextmanager
def _out_of_memory(paths: Sequence[Path], sizes: Sequence[tuple[int, int]],
                   max_megapixels: float, per_pixel: float) -> Iterator[None]:
    """Memory running out on images within the limit (raised, or a small machine) is an
    error naming them and the option, not a traceback."""
    try:
        yield
    except (MemoryError, torch.OutOfMemoryError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not isinstance(err, torch.OutOfMemoryError) \
                and "can't allocate memory" not in str(err):
            raise
        what = ", ".join(f"{p} ({w}x{h})" for p, (h, w) in zip(paths, sizes, strict=True))
        need = sum(h * w for h, w in sizes) * per_pixel / 2**30
        raise DataError(f"out of memory predicting {what}: at full resolution that needs "
                        f"about {need:.1f} GiB; downscale it or use a machine with more "
                        f"memory (--max-megapixels, now {max_megapixels:g}, refuses larger "
                        "images before decoding them)") from None


def pixel_groups(sizes: Sequence[tuple[int, int]], count: int,
                 max_pixels: float) -> list[range]:
    """Consecutive groups of at most ``count`` images and ``max_pixels`` pixels together
    (an image alone may fill a group)."""
    groups: list[range] = []
    start, pixels = 0, 0
    for i, (h, w) in enumerate(sizes):
        if i > start and (i - start >= count or pixels + h * w > max_pixels):
            groups.append(range(start, i))
            start, pixels = i, 0
        pixels += h * w
    if sizes:
        groups.append(range(start, len(sizes)))
    return groups


# ----------------------------------------------------------------------------- prediction


def tile_starts(length: int, tile: int, overlap: float = TILE_OVERLAP) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)`` (length >= tile),
    evenly spread, neighbours overlapping by at least ``overlap`` of a tile."""
    if length <= tile:
        return [0]
    stride = max(1, int(tile * (1.0 - overlap)))
    n = math.ceil((length - tile) / stride) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def tile_window(height: int, width: int) -> np.ndarray:
    """float64 ``[height, width]`` blending weights of one tile: the product of two 1-D
    triangles ``1 - |2 (i + 0.5) / n - 1|``, 1 at the centre, ``1 / n`` at the border (never
    0, so a pixel only one tile covers keeps its prediction)."""
    def ramp(n: int) -> np.ndarray:
        return 1.0 - np.abs(2.0 * (np.arange(n) + 0.5) / n - 1.0)

    return np.outer(ramp(height), ramp(width))


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
        maps = self.predict_maps(images)
        for k, m in enumerate(maps):
            require_finite_outputs(m, f"image {k}")
        return [{name: finalise(self.tasks[name], m[name]) for name in self.tasks} for m in maps]

    def predict_maps(self, images: Sequence[np.ndarray]) -> list[dict[str, Tensor]]:
        """Activated ``[C, H, W]`` predictions at each image's own size (before
        :func:`finalise`)."""
        if self.mode == "resize":
            return self._resize_mode(images)
        return [self._tile_mode(image) for image in images]

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
        window = torch.from_numpy(tile_window(th, tw)).to(self.device, torch.float32)
        sums: dict[str, Tensor] = {}
        weight = torch.zeros((1, ph, pw), device=self.device)
        for start in range(0, len(boxes), self.batch_size):
            chunk = boxes[start:start + self.batch_size]
            preds = self._run(torch.stack([padded[:, y:y + th, x:x + tw] for y, x in chunk]))
            for name, p in preds.items():
                acc = sums.setdefault(name, p.new_zeros((p.shape[1], ph, pw)))
                for i, (y, x) in enumerate(chunk):
                    acc[:, y:y + th, x:x + tw] += p[i] * window
            for y, x in chunk:
                weight[:, y:y + th, x:x + tw] += window
        return {name: (acc / weight)[:, :h, :w] for name, acc in sums.items()}


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
    """The default colour of every class id, (n,3) uint8 (:mod:`mtpsl.core.palette`: class
    ``c`` gets VOC colour ``c + 1``, never black, which means void)."""
    return default_class_colours(n)


def write_outputs(out_dir: Path, stem: str, tasks: dict[str, Task],
                  arrays: dict[str, np.ndarray], card: Mapping | None = None) -> list[Path]:
    """Write every task's files for one image (each task's ``save_prediction``, class maps
    in the colours of the run's model ``card``); return their paths."""
    from mtpsl.inference.panels import card_colours

    files = OutputFiles(out_dir, stem, card_colours(card))
    for name, task in tasks.items():
        task.save_prediction(arrays[name], files)
    return files.written


PANEL_CELL_IN = 3.0
"""Width (inches, at 100 dpi) of one picture of a ``--panel`` image."""
PANEL_TITLE_IN = 0.3


def panel_cells(task: Task, pred: Tensor, card: Mapping | None = None) -> list[Cell]:
    """The picture of one task's full-size activated prediction ``[C, H, W]`` in a panel, in
    the colours of its PNG: class maps in the run's class colours, depth over the image's
    robust range (:func:`~mtpsl.core.palette.depth_range`); other tasks as their figure cells."""
    from mtpsl.core.palette import class_colours, colour_classes, depth_range
    from mtpsl.inference.panels import card_entry
    from mtpsl.tasks import task_kind

    kind = task_kind(task)
    if kind == "segmentation":
        colours = class_colours(task.out_channels, card_entry(card, task.name).get("colours"))
        return [(colour_classes(pred.argmax(0).cpu().numpy(), colours), {})]
    cells = task.panels(None, [pred.float().cpu()])
    if kind == "depth":
        lo, hi = depth_range(pred[0].float().cpu().numpy())
        cells = [(array, {**kw, "vmin": lo, "vmax": hi}) for array, kw in cells]
    return cells


def write_panel(path: Path, image: np.ndarray, tasks: Mapping[str, Task],
                maps: Mapping[str, Tensor], card: Mapping | None = None,
                title: str = "input") -> Path:
    """``path``: the input beside every task's prediction, keys below (see the module
    docstring)."""
    from mtpsl.core.render import panel_grid
    from mtpsl.inference.panels import span_keys

    row: list[Cell] = [(np.clip(image, 0.0, 1.0), {})]
    titles = [title]
    for name, task in tasks.items():
        cells = panel_cells(task, maps[name], card)
        row += cells[:1]
        titles.append(f"{name} prediction")
    keys = span_keys(dict(tasks), [row], 1, 1, card, with_void=False)
    width = len(row) * PANEL_CELL_IN
    fig = panel_grid([row], [titles], image.shape[:2], width, PANEL_CELL_IN, PANEL_TITLE_IN,
                     keys)
    write_all({path: encoded(lambda f: fig.savefig(f, dpi=100, format="png"))})
    return path


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
    panel: bool = False,
    globs: Sequence[str] | None = None,
    skipped: list[Path] | None = None,
    max_megapixels: float = MAX_MEGAPIXELS,
) -> list[Path]:
    """``mtpsl predict``: predict every input image with the run's model; return written files.

    ``progress=None`` shows the bar only on a terminal; ``panel`` also writes
    ``<stem>_panel.png``; ``globs`` and ``skipped`` as for :func:`collect_images`. Every
    input is checked against ``max_megapixels`` from its header before the first is
    predicted (see the module docstring).
    """
    from mtpsl.engine.build import resolve_device
    from mtpsl.inference.load import load_run

    if mode not in MODES:
        raise MtpslError(f"unknown mode {mode!r}; modes: {list(MODES)}")
    files = collect_images(inputs, globs, skipped)
    dev = resolve_device(device)
    loaded = load_run(run, root=root, device=dev)
    predictor = Predictor(loaded.model, loaded.tasks, run_input_size(loaded), dev, batch_size,
                          mode)
    limit = max_megapixels * 1e6
    sizes = check_sizes(files, loaded.tasks, max_megapixels)  # before anything is written
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Resize mode batches across images; tile mode batches the tiles of one image.
    groups = pixel_groups(sizes, batch_size if mode == "resize" else 1, limit)
    written: list[Path] = []
    resized: list[tuple[int, int]] = []
    bar = tqdm(total=len(files), desc="predict", unit="img",
               disable=None if progress is None else not progress)
    with bar:
        for group in groups:
            chunk = [files[i] for i in group]
            with _out_of_memory(chunk, [sizes[i] for i in group], max_megapixels,
                                bytes_per_pixel(loaded.tasks)):
                with pil_pixel_limit(limit):  # checked above; PIL's limit not below it
                    images = [read_image(path) for path in chunk]
                resized += [image.shape[:2] for image in images
                            if mode == "resize" and image.shape[:2] != predictor.input_size]
                for path, image, maps in zip(chunk, images, predictor.predict_maps(images),
                                             strict=True):
                    require_finite_outputs(maps, f"{loaded.checkpoint} on {path}")
                    arrays = {name: finalise(task, maps[name])
                              for name, task in loaded.tasks.items()}
                    written.extend(write_outputs(out_dir, path.stem, loaded.tasks, arrays,
                                                 loaded.card))
                    if panel:
                        written.append(write_panel(out_dir / f"{path.stem}_panel.png", image,
                                                   loaded.tasks, maps, loaded.card, path.name))
                    bar.update(1)
    if resized:
        warn_resized(resized, len(files), predictor.input_size)
    return written


def warn_resized(sizes: Sequence[tuple[int, int]], total: int, trained: tuple[int, int]) -> None:
    """One line for the images resize mode had to scale to the training size (and back): a
    model sees objects at the scale it was trained at only when the image has that size."""
    h, w = sizes[0]
    print(f"warning: {len(sizes)} of {total} images are not {trained[0]}x{trained[1]}, the "
          f"size the model was trained at (e.g. {h}x{w}): they were resized to it and their "
          f"predictions back; --mode tile predicts at full resolution in tiles of that size",
          file=sys.stderr)
