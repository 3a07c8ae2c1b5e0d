"""``mtpsl data diff A B``: how two copies of one ``.npy`` layout dataset differ.

Made for "our prepared copy against the published release": per split and folder it counts
the files on either side only, and over the pairs it compares

- ``image``: PSNR in dB of the [0, 1] images (uint8 ones divided by 255);
- ``label*``: agreement, the share of pixels labelled on both sides that carry the same class,
  and the share of all pixels that are void (-1) on one side only;
- ``depth``: over pixels valid (> 0) on both sides, mean absolute and RMS difference, mean
  relative difference ``|a - b| / b``, the median ratio ``a / b`` (a scale or unit mismatch
  shows here), and the share of pixels valid on one side only;
- ``normal``: over pixels with a non-zero vector on both sides, the mean angle between the
  vectors and the share within 11.25 degrees, and the share valid on one side only.

Pairs are ``A/{i}.npy`` with ``B/{i}.npy``, unless ``match``: then each B image is paired with
the A image it looks most like (24x32 thumbnails, nearest in L2), which also tests whether the
two copies order their images alike (the report counts pairs with equal indices).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtpsl.core.errors import DataError
from mtpsl.data.prepare import geometry

_INDEX = re.compile(r"(0|[1-9][0-9]*)\.npy")
_THUMB = (24, 32)


def _kind(folder: str) -> str:
    if folder == "image":
        return "image"
    if folder.startswith("label"):
        return "label"
    return folder if folder in ("depth", "normal") else "other"


def _indices(folder: Path) -> dict[int, Path]:
    if not folder.is_dir():
        return {}
    return {int(n[:-4]): folder / n for n in os.listdir(folder) if _INDEX.fullmatch(n)}


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read .npy file ({exc})") from None


def _image(path: Path) -> np.ndarray:
    arr = _load(path)
    return arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float64)


def _plane(arr: np.ndarray) -> np.ndarray:
    return arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr


class _Stats:
    """Streaming sums of one folder's comparison (global over pixels, not per-image means)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.compared = 0
        self.shape_mismatch: list[int] = []
        self.sums: dict[str, float] = {}
        self.values: list[float] = []  # PSNR per image, or the median depth ratio per image

    def add(self, name: str, value: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(value)

    def update(self, a: np.ndarray, b: np.ndarray) -> None:
        self.compared += 1
        if self.kind == "image":
            mse = float(np.mean((a - b) ** 2))
            self.values.append(math.inf if mse == 0 else 10 * math.log10(1.0 / mse))
            return
        if self.kind == "label":
            a, b = _plane(a), _plane(b)
            both = (a >= 0) & (b >= 0)
            self.add("both", both.sum())
            self.add("equal", (both & (a == b)).sum())
            self.add("void_differs", ((a < 0) != (b < 0)).sum())
            self.add("pixels", a.size)
            return
        if self.kind == "depth":
            a, b = _plane(a).astype(np.float64), _plane(b).astype(np.float64)
            both = (a > 0) & (b > 0)
            d = a[both] - b[both]
            self.add("both", both.sum())
            self.add("abs", np.abs(d).sum())
            self.add("sq", (d**2).sum())
            self.add("rel", (np.abs(d) / b[both]).sum())
            self.add("valid_differs", ((a > 0) != (b > 0)).sum())
            self.add("pixels", a.size)
            if both.any():
                self.values.append(float(np.median(a[both] / b[both])))
            return
        if self.kind == "normal":
            na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
            both = (na > 0) & (nb > 0)
            cos = np.sum(a[both] * b[both], axis=-1) / (na[both] * nb[both])
            angle = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
            self.add("both", both.sum())
            self.add("angle", angle.sum())
            self.add("within", (angle < 11.25).sum())
            self.add("valid_differs", ((na > 0) != (nb > 0)).sum())
            self.add("pixels", na.size)
            return
        self.add("max_abs", 0.0)
        self.sums["max_abs"] = max(self.sums["max_abs"],
                                   float(np.abs(a.astype(np.float64) - b).max(initial=0)))

    def result(self) -> dict[str, Any]:
        s = self.sums
        out: dict[str, Any] = {"kind": self.kind, "compared": self.compared,
                               "shape_mismatch": len(self.shape_mismatch)}

        def share(num: str, den: str) -> float | None:
            return s[num] / s[den] if s.get(den) else None

        if self.kind == "image":
            finite = [v for v in self.values if math.isfinite(v)]
            out.update(psnr_mean=float(np.mean(finite)) if finite else None,
                       psnr_min=min(finite) if finite else None,
                       identical=len(self.values) - len(finite))
        elif self.kind == "label":
            out.update(agreement=share("equal", "both"),
                       void_differs=share("void_differs", "pixels"))
        elif self.kind == "depth":
            both = s.get("both", 0.0)
            out.update(mae=s["abs"] / both if both else None,
                       rmse=math.sqrt(s["sq"] / both) if both else None,
                       rel=s["rel"] / both if both else None,
                       ratio_median=float(np.median(self.values)) if self.values else None,
                       valid_differs=share("valid_differs", "pixels"))
        elif self.kind == "normal":
            out.update(mean_angle_deg=share("angle", "both"),
                       within_11_25=share("within", "both"),
                       valid_differs=share("valid_differs", "pixels"))
        else:
            out.update(max_abs=s.get("max_abs"))
        return out


def detect(root: Path) -> str:
    """The dataset of a layout: ``prepare.json``'s, else from its folder names."""
    manifest = root / "prepare.json"
    if manifest.is_file():
        try:
            return str(json.loads(manifest.read_text())["dataset"])
        except (ValueError, KeyError, TypeError):
            pass
    names = {p.name for split in root.iterdir() if split.is_dir() for p in split.iterdir()} \
        if root.is_dir() else set()
    if "label_7" in names or "label_19" in names:
        return "cityscapes"
    return "nyuv2" if "label" in names or "normal" in names else "unknown"


def _splits(a: Path, b: Path) -> list[str]:
    def have(root: Path) -> set[str]:
        if not root.is_dir():
            raise DataError(f"{root} does not exist")
        return {p.name for p in root.iterdir() if (p / "image").is_dir()}

    sa, sb = have(a), have(b)
    common = sorted(sa & sb)
    if not common:
        raise DataError(f"{a} ({', '.join(sorted(sa)) or 'no splits'}) and {b} "
                        f"({', '.join(sorted(sb)) or 'no splits'}) share no split with an "
                        "image/ folder")
    return common


def match_images(a: dict[int, Path], b: dict[int, Path]) -> dict[int, int]:
    """B index -> the A index whose image looks most alike (thumbnail L2)."""
    ka, kb = sorted(a), sorted(b)

    def thumbs(files: dict[int, Path], keys: list[int]) -> np.ndarray:
        return np.stack([geometry.resize_bilinear(_image(files[k]), _THUMB).ravel()
                         for k in keys])

    ta, tb = thumbs(a, ka), thumbs(b, kb)
    dist = (tb**2).sum(1)[:, None] - 2 * tb @ ta.T + (ta**2).sum(1)[None, :]
    return {kb[j]: ka[int(np.argmin(dist[j]))] for j in range(len(kb))}


def diff_layouts(
    a: Path,
    b: Path,
    *,
    splits: Sequence[str] | None = None,
    match: bool = False,
    limit: int | None = None,
    progress: Callable[[int, str], Any] | None = None,
) -> dict[str, Any]:
    """The comparison of two layouts as a JSON-ready dict (see the module docstring)."""
    report: dict[str, Any] = {"a": str(a), "b": str(b), "dataset_a": detect(a),
                              "dataset_b": detect(b), "splits": {}}
    for split in splits or _splits(a, b):
        folders = sorted({p.name for root in (a, b) if (root / split).is_dir()
                          for p in (root / split).iterdir() if p.is_dir()})
        files = {f: (_indices(a / split / f), _indices(b / split / f)) for f in folders}
        img_a, img_b = files.get("image", ({}, {}))
        if match:
            pairs = match_images(img_a, img_b)
            same = sum(ia == ib for ib, ia in pairs.items())
            pairing: dict[str, Any] = {
                "by": "image similarity", "pairs": len(pairs), "same_index": same,
                "a_used_twice": len(pairs) - len(set(pairs.values()))}
        else:
            pairs = {i: i for i in sorted(set(img_a) & set(img_b))}
            pairing = {"by": "index", "pairs": len(pairs)}
        keys = sorted(pairs)[:limit] if limit else sorted(pairs)
        out: dict[str, Any] = {"pairing": pairing, "folders": {}}
        bar = progress(len(keys) * len(folders), split) if progress else None
        for folder in folders:
            fa, fb = files[folder]
            stats = _Stats(_kind(folder))
            for ib in keys:
                ia = pairs[ib]
                if ia in fa and ib in fb:
                    x = _image(fa[ia]) if stats.kind == "image" else _load(fa[ia])
                    y = _image(fb[ib]) if stats.kind == "image" else _load(fb[ib])
                    if _plane(x).shape != _plane(y).shape:
                        stats.shape_mismatch.append(ib)
                    else:
                        stats.update(x, y)
                if bar is not None:
                    bar.update(1)
            result = stats.result()
            result["only_a"] = sorted(set(fa) - set(fb))
            result["only_b"] = sorted(set(fb) - set(fa))
            if not fa or not fb:
                result["folder_only_in"] = "a" if fa else "b"
            out["folders"][folder] = result
        if bar is not None:
            bar.close()
        report["splits"][split] = out
    return report


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f} %"


def _num(v: float | None, fmt: str = ".4g") -> str:
    return "n/a" if v is None else format(v, fmt)


def _ids(values: list[int]) -> str:
    shown = ", ".join(map(str, values[:8]))
    return f"{len(values)} ({shown}{', ...' if len(values) > 8 else ''})"


def format_report(report: dict[str, Any]) -> str:
    """The report as the lines ``mtpsl data diff`` prints."""
    lines = [f"A = {report['a']} ({report['dataset_a']})",
             f"B = {report['b']} ({report['dataset_b']})"]
    if report["dataset_a"] != report["dataset_b"]:
        lines.append("warning: the two folders look like different datasets")
    for split, out in report["splits"].items():
        p = out["pairing"]
        head = f"{split}: {p['pairs']} image pairs by {p['by']}"
        if p["by"] != "index":
            head += (f"; {p['same_index']} with equal indices, {p['a_used_twice']} A images "
                     "matched twice")
        lines.append(head)
        for folder, r in out["folders"].items():
            if "folder_only_in" in r:
                lines.append(f"  {folder:<9} only in {r['folder_only_in'].upper()}")
                continue
            kind = r["kind"]
            if kind == "image":
                text = (f"PSNR mean {_num(r['psnr_mean'], '.2f')} dB, min "
                        f"{_num(r['psnr_min'], '.2f')} dB, identical {r['identical']}")
                if r["psnr_mean"] is not None and r["psnr_mean"] < 15:
                    text += " (so low that the pairs may be different images: try --match)"
            elif kind == "label":
                text = (f"agreement {_pct(r['agreement'])} of pixels labelled on both sides; "
                        f"void on one side only {_pct(r['void_differs'])}")
            elif kind == "depth":
                text = (f"MAE {_num(r['mae'])}, RMSE {_num(r['rmse'])}, relative "
                        f"{_pct(r['rel'])}, median ratio A/B {_num(r['ratio_median'])}; "
                        f"valid on one side only {_pct(r['valid_differs'])}")
            elif kind == "normal":
                text = (f"mean angle {_num(r['mean_angle_deg'], '.2f')} deg, within 11.25 deg "
                        f"{_pct(r['within_11_25'])}; valid on one side only "
                        f"{_pct(r['valid_differs'])}")
            else:
                text = f"max |A - B| {_num(r['max_abs'])}"
            lines.append(f"  {folder:<9} {r['compared']} compared: {text}")
            if r["shape_mismatch"]:
                lines.append(f"  {'':<9} {r['shape_mismatch']} pairs of different shapes "
                             "(not compared)")
            for side in ("only_a", "only_b"):
                if r[side]:
                    lines.append(f"  {'':<9} files only in {side[-1].upper()}: {_ids(r[side])}")
    return "\n".join(lines)
