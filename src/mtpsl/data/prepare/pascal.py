"""``mtpsl data prepare pascal_context``: check a ``PASCAL_MT`` folder, write the parts lists.

The benchmark's loader ("Multi-Task-Learning-PyTorch", after facebookresearch/astmt) writes
``ImageSets/Parts/{split}.txt`` on its first run: a JSON object, image id -> the Pascal-Part
class index of each object of ``human_parts/{id}.mat`` in file order (-1 for an object whose
mask has no more than ``area_thres`` pixels, 0 by default), laid out one id per line with a
tab. The loader counts an image as having human parts when 15 (person) is in its list. This
command writes the same files (same bytes), checks that every listed image has its files, and
reports per task how many images are labelled. Nothing is moved or converted: ``mtpsl`` reads
the folder as it is (:mod:`mtpsl.data.pascal`).

The benchmark keeps a distilled normal only on the context classes it shares with NYUv2 plus
tvmonitor (its ``db_info`` JSON files); :data:`NORMAL_CLASSES` holds those LabelMap ids, and
``prepare.json`` repeats them for ``dataset.options.normal_classes``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mtpsl.core.errors import DataError
from mtpsl.data.prepare.common import PrepareRun, Summary, missing

SPLITS = ("train", "val")
RELEASE = {"train": 4998, "val": 5105}
PERSON = 15
NORMAL_CLASSES = (
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49,
    50, 51, 53, 55, 56, 59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101,
    104, 105, 107, 111, 113, 115, 122, 124, 135, 141, 142, 143, 146, 150, 154, 157, 158, 159,
    165, 172, 174, 181, 183, 184, 191, 193, 195, 197, 199, 202, 213, 215, 216, 219, 220, 223,
    225, 228, 230, 232, 233, 238, 239, 242, 243, 246, 250, 251, 252, 255, 260, 261, 263, 269,
    272, 273, 275, 281, 283, 284, 285, 286, 287, 288, 290, 291, 292, 293, 295, 304, 307, 309,
    310, 314, 315, 319, 323, 329, 330, 331, 336, 342, 345, 349, 350, 351, 352, 355, 357, 368,
    370, 371, 374, 379, 380, 383, 384, 397, 401, 403, 405, 407, 408, 411, 412, 413, 414, 417,
    419, 421, 423, 427, 429, 430, 432, 440, 441, 442, 443, 444, 446, 454, 457)
"""PASCAL-Context LabelMap ids (of the 459 classes) whose distilled normals the benchmark
keeps: the names in both ``nyu_classes.json`` and ``context_classes.json`` except "unknown",
plus tvmonitor (427); 170 ids."""
FILES = {  # task (ours) -> candidate paths under ROOT ({id} filled in), benchmark name
    "image": (("JPEGImages/{id}.jpg",), "image"),
    "semantic": (("semseg/VOC12/{id}.png", "semseg/pascal-context/{id}.png"), "semseg"),
    "parts": (("human_parts/{id}.mat",), "human_parts"),
    "normal": (("normals_distill/{id}.png",), "normals"),
    "saliency": (("sal_distill/{id}.png",), "sal"),
    "edges": (("pascal-context/trainval/{id}.mat",), "edge"),
}


def _find(root: Path, task: str, image_id: str) -> Path | None:
    for pattern in FILES[task][0]:
        path = root / pattern.format(id=image_id)
        if path.is_file():
            return path
    return None


def _as_list(value: Any) -> list:
    """scipy's squeezed struct arrays: one struct, an array of them, or empty."""
    if value is None:
        return []
    return list(value.ravel()) if isinstance(value, np.ndarray) else [value]


def object_classes(path: Path, area_thres: int = 0) -> tuple[list[int], bool]:
    """The benchmark's list for one ``human_parts`` file, and whether a person object has
    annotated parts (what mtpsl's reader needs for a parts label)."""
    from scipy.io import loadmat

    try:
        anno = loadmat(path, squeeze_me=True, struct_as_record=False)["anno"]
        objects = _as_list(anno.objects)
    except Exception as exc:  # scipy's many errors for bad files, a missing variable
        raise DataError(f"{path}: not a Pascal-Part annotation ({exc!r})") from None
    classes: list[int] = []
    person_parts = False
    for obj in objects:  # a struct array (the release) or a cell of structs: both read alike
        try:
            cls = int(obj.class_ind)
            area = int(np.asarray(obj.mask).astype(bool).sum())
            parts = _as_list(getattr(obj, "parts", None))
        except (AttributeError, TypeError, ValueError) as exc:
            raise DataError(f"{path}: object without class_ind or mask ({exc})") from None
        classes.append(cls if area > area_thres else -1)
        person_parts |= cls == PERSON and len(parts) > 0
    return classes, person_parts


def parts_list_text(classes: dict[str, list[int]]) -> str:
    """The bytes the benchmark writes: ``{`` + one ``\\t"id": [..]`` per line + ``}``."""
    body = ",\n".join(f'\t"{image_id}": {json.dumps(c)}' for image_id, c in classes.items())
    return "{\n" + body + "\n}\n"


def prepare_pascal(
    root: Path,
    *,
    area_thres: int = 0,
    progress: bool = True,
    on_start: Callable[[str], None] | None = None,
) -> tuple[Summary, dict[str, dict[str, int]]]:
    """Write ``ImageSets/Parts/{train,val}.txt`` into ``root``; counts per split and task."""
    from mtpsl.data.pascal import read_ids

    if not root.is_dir():
        raise missing(root, "the PASCAL_MT folder", "PASCAL_MT")
    for task, (patterns, _) in FILES.items():
        folders = [root / Path(p).parent for p in patterns]
        if not any(f.is_dir() for f in folders):
            raise DataError(f"{folders[0]} (for {task}) does not exist: {root} is not a "
                            "complete PASCAL_MT folder")
    ids = {split: read_ids(root, split) for split in SPLITS}
    found: dict[str, dict[str, list[Path | None]]] = {
        split: {task: [_find(root, task, i) for i in split_ids] for task in FILES}
        for split, split_ids in ids.items()}
    for split, tasks in found.items():
        lacking = [i for i, p in zip(ids[split], tasks["image"], strict=True) if p is None]
        if lacking:
            raise DataError(f"{root / 'JPEGImages' / (lacking[0] + '.jpg')} does not exist "
                            f"({len(lacking)} images of the {split} split missing)")
    inputs = [(p.relative_to(root).as_posix(), p) for split in SPLITS
              for p in (root / "ImageSets" / "Context" / f"{split}.txt",)]
    seen: set[str] = set()
    for tasks in found.values():
        for paths in tasks.values():
            for p in paths:
                if p is not None and (rel := p.relative_to(root).as_posix()) not in seen:
                    seen.add(rel)
                    inputs.append((rel, p))
    if on_start:
        on_start(f"pascal_context: {len(ids['train'])} train, {len(ids['val'])} val images "
                 f"in {root}; hashing {len(inputs)} files")
    run = PrepareRun(root, "pascal_context", {"area_thres": area_thres}, inputs,
                     libraries=("numpy", "scipy"), in_place=True, progress=progress)
    counts: dict[str, dict[str, int]] = {}
    notes: list[str] = []
    for split in SPLITS:
        parts_paths = found[split]["parts"]
        classes: dict[str, list[int]] = {}
        with_parts = 0
        with run.items(len(ids[split]), f"parts {split}") as bar:
            for image_id, path in zip(ids[split], parts_paths, strict=True):
                if path is not None:
                    classes[image_id], has = object_classes(path, area_thres)
                    with_parts += has
                bar.update(1)
        name = f"ImageSets/Parts/{split}.txt"
        text = parts_list_text(classes).encode()
        old = root / name
        if old.is_file() and old.read_bytes() != text:
            notes.append(f"note: {old} differed from the benchmark's list for these files "
                         "and was replaced")
        if not run.done([name]):
            run.write({name: text})
        counts[split] = {"images": len(ids[split])}
        for task in FILES:
            if task != "image":
                counts[split][task] = sum(p is not None for p in found[split][task])
        counts[split]["parts (benchmark: a person object)"] = sum(
            PERSON in c for c in classes.values())
        counts[split]["parts (mtpsl: a person with annotated parts)"] = with_parts
        if len(ids[split]) != RELEASE[split]:
            notes.append(f"note: the benchmark's {split} split has {RELEASE[split]} images, "
                         f"this folder {len(ids[split])}")
        short = [t for t in FILES if t != "image" and counts[split][t] < len(ids[split])]
        if short:
            notes.append(f"note: {split}: {', '.join(short)} lack files for some images (mtpsl "
                         "reads them as unlabelled; the benchmark's loader refuses the folder)")
    summary = run.finish({
        "splits": counts,
        "dataset_options": {"normal_classes": list(NORMAL_CLASSES)},
        "hypotheses": ["parts lists as the benchmark's _preprocess_parts writes them "
                       f"(area_thres {area_thres})"],
    })
    summary.notes.extend(notes)
    return summary, counts
