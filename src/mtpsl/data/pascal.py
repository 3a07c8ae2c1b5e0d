"""PASCAL-Context in the five-task layout of the "Multi-Task-Learning-PyTorch" benchmark.

``ROOT`` holds::

    JPEGImages/{id}.jpg                  RGB images (sizes differ, at most 500 px a side)
    semseg/pascal-context/{id}.png       21 classes (0 = background), 255 = ignore
    human_parts/{id}.mat                 Pascal-Part annotation (``anno.objects``)
    normals_distill/{id}.png             RGB, n = 2 * v / 255 - 1; (0, 0, 0) = no label
    sal_distill/{id}.png                 grey saliency, > 127 = salient
    pascal-context/trainval/{id}.mat     ``LabelMap`` (context classes): edges = its boundaries
    ImageSets/Context/{train,val}.txt    one image id per line

Tasks (dataset order): ``semantic`` (21 classes), ``parts`` (7: background, head, torso,
upper arms, lower arms, upper legs, lower legs), ``normal``, ``saliency``, ``edges``. An image
without a person with annotated parts has no ``parts`` label: its file is missing, or it
decodes to no person, and the item reports ``available = False`` for it (the reference marks
such images all-ignore). A missing file of another task makes that label unavailable too.

Every item is brought to ``size`` (default 512 x 512) by :func:`fit_to_size`: bottom/right
padding whose labels are blank, so batches stack and padded pixels are never scored; evaluation
therefore runs on the padded tensors (metrics skip the padding, and the edge measure crops each
image to its labelled pixels, so its tolerance is relative to the image's own diagonal).
``size=None`` keeps native sizes (batch size 1 only).
(The benchmark's code instead warps every image to 512 x 512 with a fixed resize and scores
predictions resized back; padding keeps the aspect ratio and scores every label pixel at its
own resolution.) Training augmentation is the usual ``dataset.augment`` zoom (1, 1.2, 1.5,
crop of 1/s resized back) and flip, applied to the padded item.

Which normal pixels are valid: the benchmark's loader keeps the distilled normal only where the
``LabelMap`` class is one it lists as having a normal (the context classes shared with NYUv2,
from its ``json/`` files, plus ``tvmonitor``); its PNGs hold a vector at every pixel. mtpsl
reads validity from the file, a pixel being valid when its stored RGB is not (0, 0, 0) and its
vector is non-zero, which is right for files written pre-masked (as ``mtpsl data synth`` writes
them); for the benchmark's raw files pass the class ids of its list as the dataset option
``normal_classes`` and validity becomes "stored vector non-zero and LabelMap in the list".

Construction checks the layout from file headers only (JPEG/PNG sizes and modes, ``.mat``
variable shapes), so a broken download fails at once with a :class:`DataError` naming the file.

Departures from the papers and reference code, with the options and tests that pin them:
``docs/fidelity.md``, section "Dataset conventions".
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mtpsl.core.errors import DataError
from mtpsl.data.base import TaskDataset, check_split_name
from mtpsl.data.layout import DATASETS, _ls, _select, known_names
from mtpsl.data.transforms import fit_to_size
from mtpsl.tasks import Task, build_task

PASCAL_TASKS: tuple[str, ...] = ("semantic", "parts", "normal", "saliency", "edges")
REFERENCE_TASK_NAMES: dict[str, str] = {
    "semseg": "semantic",
    "human_parts": "parts",
    "normals": "normal",
    "sal": "saliency",
    "edge": "edges",
}
"""The benchmark's task names -> ours (reference split files use theirs)."""
REFERENCE_LOSS_WEIGHTS: dict[str, float] = {
    "semantic": 1.0,
    "parts": 2.0,
    "normal": 10.0,
    "saliency": 5.0,
    "edges": 50.0,
}
"""Fixed task weights of the MTI-Net / ATRC PASCAL-Context setups."""
PART_CLASSES = ["background", "head", "torso", "upper arm", "lower arm", "upper leg", "lower leg"]
PART_OF_NAME: dict[str, int] = {
    **dict.fromkeys(
        [
            "head",
            "hair",
            "leye",
            "reye",
            "lear",
            "rear",
            "lebrow",
            "rebrow",
            "nose",
            "mouth",
            "neck",
        ],
        1,
    ),
    "torso": 2,
    **dict.fromkeys(["luarm", "ruarm"], 3),
    **dict.fromkeys(["llarm", "rlarm", "lhand", "rhand"], 4),
    **dict.fromkeys(["luleg", "ruleg"], 5),
    **dict.fromkeys(["llleg", "rlleg", "lfoot", "rfoot"], 6),
}
"""Pascal-Part part names -> the 7 part classes (neck counts as head)."""
SEMANTIC_CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor")
"""The 21 classes of ``semantic`` in label order (background + the 20 PASCAL VOC classes)."""
PERSON_CLASS = 15  # Pascal VOC class index of "person"
SEMANTIC_CLASSES = 21
IGNORE_PNG = 255

_FILES = {  # task -> (folder under ROOT, extension)
    "image": ("JPEGImages", ".jpg"),
    "semantic": ("semseg/pascal-context", ".png"),
    "parts": ("human_parts", ".mat"),
    "normal": ("normals_distill", ".png"),
    "saliency": ("sal_distill", ".png"),
    "edges": ("pascal-context/trainval", ".mat"),
}
_PNG_MODES = {"semantic": ("L", "P"), "normal": ("RGB",), "saliency": ("L",)}


def _pil():
    from PIL import Image, UnidentifiedImageError

    return Image, UnidentifiedImageError


def _loadmat(path: Path, **kwargs) -> dict:
    from scipy.io import loadmat

    try:
        return loadmat(path, **kwargs)
    except Exception as exc:  # scipy raises ValueError/TypeError/OSError... for bad files
        raise DataError(f"{path}: cannot read .mat file ({exc})") from None


def _mat_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from scipy.io import whosmat

    try:
        return {name: tuple(shape) for name, shape, _ in whosmat(path)}
    except Exception as exc:
        raise DataError(f"{path}: cannot read .mat file ({exc})") from None


def _image_size(path: Path, modes: tuple[str, ...] | None = None) -> tuple[int, int]:
    """(height, width) from the file header; checks the colour mode when ``modes`` is given."""
    image, unidentified = _pil()
    try:
        with image.open(path) as im:
            width, height = im.size
            mode = im.mode
    except (OSError, unidentified) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None
    if modes is not None and mode not in modes:
        raise DataError(f"{path}: expected image mode {' or '.join(modes)}, got {mode}")
    return height, width


def read_ids(root: Path, split: str) -> list[str]:
    """Image ids of ``ImageSets/Context/{split}.txt``."""
    check_split_name(split, root)  # a split is a list name, never a path out of the root
    sets = root / "ImageSets" / "Context"
    path = sets / f"{split}.txt"
    if not path.is_file():
        have = _ls(sets) if sets.is_dir() else f"(no folder {sets})"
        raise DataError(f"split file {path} does not exist; {sets} holds: {have}")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"split file {path} lists no image ids")
    seen: set[str] = set()
    for image_id in ids:
        # an id names files inside the root's folders: a path would read anywhere
        if "/" in image_id or "\\" in image_id or image_id in (".", "..") or "\0" in image_id:
            raise DataError(f"split file {path}: image id {image_id!r} is a path; ids are "
                            "file names without folders (e.g. 2008_000002)")
        if image_id in seen:
            raise DataError(f"split file {path}: image id {image_id!r} is listed twice")
        seen.add(image_id)
    return ids


def edges_from_labels(labels: np.ndarray) -> np.ndarray:
    """1-pixel semantic boundaries: pixels whose label differs from the one below or right.

    The reference takes the non-zero Laplacian of the label map and thins it; this one-sided
    difference gives a boundary of the same 1-pixel width without a thinning step.
    """
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    return edge.astype(np.float32)


def _as_list(value) -> list:
    """scipy's squeezed struct arrays: a single struct, an array of them, or empty."""
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        return list(value.ravel())
    return [value]


def parts_from_mat(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """Part class map (0 background) of every person with parts; None when there is none."""
    data = _loadmat(path, squeeze_me=True, struct_as_record=False)
    if "anno" not in data:
        raise DataError(f"{path}: no 'anno' variable (expected a Pascal-Part annotation)")
    target: np.ndarray | None = None
    try:
        for obj in _as_list(data["anno"].objects):
            parts = _as_list(getattr(obj, "parts", None))
            if int(obj.class_ind) != PERSON_CLASS or not parts:
                continue
            if target is None:
                target = np.zeros(shape, dtype=np.int64)
            for part in parts:
                name = str(part.part_name)
                if name not in PART_OF_NAME:
                    raise DataError(
                        f"{path}: unknown part name {name!r}; known: {sorted(PART_OF_NAME)}"
                    )
                mask = np.asarray(part.mask).astype(bool)
                if mask.shape != shape:
                    raise DataError(f"{path}: part mask shape {mask.shape}, image is {shape}")
                target[mask] = PART_OF_NAME[name]
    except AttributeError as exc:
        raise DataError(f"{path}: not a Pascal-Part annotation ({exc})") from None
    return target


class PascalContextDataset(TaskDataset):
    """Items like :class:`~mtpsl.data.layout.LayoutDataset`'s: ``image`` ``[3,H,W]`` in
    [0,1], one target per task (blank where unavailable), ``index``, ``available`` ``[T]``;
    ``image_ids`` lists the ids in item order."""

    split: str
    image_ids: list[str]

    def __init__(
        self,
        root: str | Path,
        split: str,
        tasks: Mapping[str, Task],
        *,
        size: tuple[int, int] | None = (512, 512),
        cache: bool = False,
        normal_classes: Iterable[int] | None = None,
    ) -> None:
        self.root = Path(root)
        self.normal_classes = None if normal_classes is None else sorted(
            {int(c) for c in normal_classes})
        self.split = split
        self.tasks = dict(tasks)
        self.task_names = tuple(self.tasks)
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.cache = cache
        self._cache: dict[int, dict[str, Tensor]] = {}
        self._scan()

    def _scan(self) -> None:
        if not self.root.is_dir():
            raise DataError(f"dataset root {self.root} does not exist")
        for key in ("image", *self.task_names):
            folder = self.root / _FILES[key][0]
            if not folder.is_dir():
                raise DataError(
                    f"folder {folder} (for {key}) does not exist; {self.root} holds: "
                    f"{_ls(self.root)}"
                )
        self.image_ids = read_ids(self.root, self.split)
        self.sizes = [self._check_image(i) for i in self.image_ids]
        available = np.zeros((len(self.image_ids), len(self.task_names)), dtype=bool)
        for t, name in enumerate(self.task_names):
            for i, image_id in enumerate(self.image_ids):
                available[i, t] = self._check_label(name, image_id, self.sizes[i])
        self.available = available
        if self.size is not None:
            self.height, self.width = self.size

    def path(self, key: str, image_id: str) -> Path:
        folder, ext = _FILES[key]
        return self.root / folder / f"{image_id}{ext}"

    def _check_image(self, image_id: str) -> tuple[int, int]:
        path = self.path("image", image_id)
        if not path.is_file():
            raise DataError(f"image {path} (listed in the {self.split} split) does not exist")
        return _image_size(path)

    def _check_label(self, name: str, image_id: str, size: tuple[int, int]) -> bool:
        """Header checks of one label file; False when it is missing (label unavailable)."""
        path = self.path(name, image_id)
        if not path.is_file():
            return False
        if name in _PNG_MODES:
            got = _image_size(path, _PNG_MODES[name])
        elif name == "edges":
            shapes = _mat_shapes(path)
            if "LabelMap" not in shapes:
                raise DataError(f"{path}: no 'LabelMap' variable; has {sorted(shapes)}")
            got = (int(shapes["LabelMap"][0]), int(shapes["LabelMap"][1]))
        else:
            shapes = _mat_shapes(path)
            if "anno" not in shapes:
                raise DataError(f"{path}: no 'anno' variable; has {sorted(shapes)}")
            return True
        if tuple(got) != tuple(size):
            raise DataError(f"{path}: size {tuple(got)} differs from its image's {size}")
        return True

    def __len__(self) -> int:
        return len(self.image_ids)

    def file_listing(self) -> list[tuple[str, int]]:
        """(path relative to the root, size in bytes) of every file read (fingerprints)."""
        paths = [self.path(key, i) for key in ("image", *self.task_names)
                 for i in self.image_ids]
        return [(p.relative_to(self.root).as_posix(), p.stat().st_size)
                for p in paths if p.is_file()]

    @property
    def missing_counts(self) -> dict[str, int]:
        """Images without a label file, per task (``parts`` may lose more when decoded)."""
        return super().missing_counts

    def __repr__(self) -> str:
        size = "native" if self.size is None else f"{self.size[0]}x{self.size[1]}"
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
            f"n={len(self)}, size={size}, tasks={list(self.task_names)})"
        )

    # -- decoding --------------------------------------------------------------------------
    def _read_png(self, name: str, image_id: str) -> np.ndarray:
        image, unidentified = _pil()
        path = self.path(name, image_id)
        try:
            with image.open(path) as im:
                return np.array(im)
        except (OSError, unidentified) as exc:
            raise DataError(f"{path}: cannot decode image ({exc})") from None

    def _decode(self, name: str, image_id: str, shape: tuple[int, int]) -> np.ndarray | None:
        if name == "semantic":
            raw = self._read_png(name, image_id).astype(np.int64)
            bad = (raw >= SEMANTIC_CLASSES) & (raw != IGNORE_PNG)
            if bad.any():
                values = sorted(set(raw[bad].tolist()))[:10]
                raise DataError(
                    f"{self.path(name, image_id)}: label values {values} "
                    f"outside 0..{SEMANTIC_CLASSES - 1} and {IGNORE_PNG} = ignore"
                )
            return np.where(raw == IGNORE_PNG, -1, raw)
        if name == "parts":
            return parts_from_mat(self.path(name, image_id), shape)
        if name == "normal":
            raw = self._read_png(name, image_id).astype(np.float32)
            vec = 2.0 * raw / 255.0 - 1.0
            norm = np.linalg.norm(vec, axis=-1, keepdims=True)
            valid = (raw != 0).any(axis=-1, keepdims=True) & (norm > 0)
            if self.normal_classes is not None:
                labels = np.asarray(_loadmat(self.path("edges", image_id))["LabelMap"])
                valid &= np.isin(labels, self.normal_classes)[..., None]
            return np.where(valid, vec / np.maximum(norm, 1e-12), 0.0).transpose(2, 0, 1)
        if name == "saliency":
            return (self._read_png(name, image_id) > 127).astype(np.float32)[None]
        labels = _loadmat(self.path(name, image_id))["LabelMap"]
        return edges_from_labels(np.asarray(labels))[None]

    def _item(self, index: int) -> dict[str, Tensor]:
        image_id = self.image_ids[index]
        image, unidentified = _pil()
        path = self.path("image", image_id)
        try:
            with image.open(path) as im:
                rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        except (OSError, unidentified) as exc:
            raise DataError(f"{path}: cannot decode image ({exc})") from None
        shape = rgb.shape[:2]
        item: dict[str, Tensor] = {"image": torch.from_numpy(rgb).permute(2, 0, 1).contiguous()}
        available = self.available[index].copy()
        for t, (name, task) in enumerate(self.tasks.items()):
            arr = self._decode(name, image_id, shape) if available[t] else None
            available[t] = arr is not None
            item[name] = self._target(task, arr, shape)
        if self.size is not None:
            item = fit_to_size(item, self.tasks, self.size)
        item["available"] = torch.from_numpy(available)
        return item

    def _target(self, task: Task, arr: np.ndarray | None, shape: tuple[int, int]) -> Tensor:
        if task.label_dims == 0:
            blank = torch.zeros(shape, dtype=torch.int64)
            return task.blank_like(blank) if arr is None else torch.from_numpy(arr)
        if arr is None:
            return task.blank_like(torch.zeros(task.label_dims, *shape, dtype=torch.float32))
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index = int(index) % n
        if self.cache and index in self._cache:
            item = {k: v.clone() for k, v in self._cache[index].items()}
        else:
            item = self._item(index)
            if self.cache:
                self._cache[index] = {k: v.clone() for k, v in item.items()}
        item["index"] = torch.tensor(index, dtype=torch.int64)
        return item


def pascal_tasks(
    names: Iterable[str], loss_weights: Mapping[str, float] | None = None,
    edge_measure: str = "bsds", edge_workers: int = 0, scoring: str = "mtpsl",
) -> dict[str, Task]:
    """The benchmark's task instances (losses and reference loss weights) for ``names``;
    ``edge_measure`` and ``edge_workers`` as :class:`~mtpsl.tasks.binary.EdgeTask`'s
    ``measure`` and ``workers``; ``scoring="benchmark"`` scores as the benchmark's evaluation
    code does (an absent class counts 0 in mIoU, SEISM's odsF)."""
    if edge_measure not in ("bsds", "dilation"):
        raise ValueError(f"edge_measure must be 'bsds' (the published odsF) or 'dilation' "
                         f"(fast, for monitoring), got {edge_measure!r}")
    if scoring not in ("mtpsl", "benchmark"):
        raise ValueError(f"scoring must be 'mtpsl' or 'benchmark', got {scoring!r}")
    bench = scoring == "benchmark"
    absent = "zero" if bench else "skip"
    weights = dict(REFERENCE_LOSS_WEIGHTS)
    unknown = sorted(set(loss_weights or {}) - set(PASCAL_TASKS))
    if unknown:
        raise ValueError(f"loss_weights names unknown task(s) {unknown}; tasks: {PASCAL_TASKS}")
    weights.update({k: float(v) for k, v in (loss_weights or {}).items()})
    make = {
        "semantic": lambda w: build_task("segmentation", "semantic", num_classes=21,
                                         loss_weight=w, absent_class=absent),
        "parts": lambda w: build_task("segmentation", "parts", num_classes=7, loss_weight=w,
                                      absent_class=absent),
        "normal": lambda w: build_task("normal", "normal", loss_kind="l1", loss_weight=w),
        "saliency": lambda w: build_task("saliency", "saliency", loss_weight=w),
        "edges": lambda w: build_task("edge", "edges", loss_weight=w, measure=edge_measure,
                                      workers=edge_workers,
                                      protocol="seism" if bench else "bsds"),
    }
    return {n: make[n](weights[n]) for n in names}


@DATASETS.register("pascal_context")
def pascal_context(
    root: str | Path,
    split: str,
    *,
    tasks: Iterable[str] = PASCAL_TASKS,
    size: tuple[int, int] | list[int] | None = (512, 512),
    loss_weights: Mapping[str, float] | None = None,
    cache: bool = False,
    edge_measure: str = "bsds",
    edge_workers: int = 0,
    normal_classes: list[int] | None = None,
    scoring: str = "mtpsl",
) -> PascalContextDataset:
    """PASCAL-Context, five tasks (see the module docstring); ``loss_weights`` overrides the
    reference weights per task (e.g. all 1.0 for an unweighted sum); ``edge_measure``
    ``"dilation"`` scores edges with the fast approximation (monitoring, not comparable with
    published odsF); ``edge_workers`` scores edges in that many processes during evaluation;
    ``normal_classes`` makes normal validity follow the label map; ``scoring="benchmark"``
    scores semantic/parts mIoU and edges exactly as the benchmark's evaluation code does."""
    names = _select(tasks, list(PASCAL_TASKS), "pascal_context")
    if size is not None and (
        len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size)
    ):
        raise ValueError(f"pascal_context size must be [height, width] or null, got {size!r}")
    if os.fspath(root) == "":
        raise ValueError("pascal_context root is empty")
    ds = PascalContextDataset(
        root,
        split,
        pascal_tasks(names, loss_weights, edge_measure, edge_workers, scoring),
        size=None if size is None else (int(size[0]), int(size[1])),
        cache=cache,
        normal_classes=normal_classes,
    )
    ds.class_names = known_names(
        ds.task_names, {"semantic": SEMANTIC_CLASS_NAMES, "parts": tuple(PART_CLASSES)})
    return ds
