"""``mtpsl data prepare nyuv2``: MTAN's 288x384 13-class NYUv2 layout from the official files.

Inputs: ``nyu_depth_v2_labeled.mat`` (MATLAB v7.3, i.e. HDF5, read with h5py one image at a
time: the 2.8 GB file is never loaded whole), ``splits.mat`` (1-based ``trainNdxs`` 795 and
``testNdxs`` 654) and a normals source. h5py shows MATLAB's axes reversed: ``images``
``(N, 3, W, H)`` uint8, ``depths`` ``(N, W, H)`` single (metres), ``labels`` ``(N, W, H)``
uint16 (0 unlabelled, 1..894).

Per image: the 894 -> 40 map of Gupta et al. (``classMapping40.mat``'s ``mapClass``, embedded
below), the 40 -> 13 map of Couprie et al. (``class13Mapping.mat``'s ``labels13``), then minus
one, so -1 is void and 0..12 the classes in :data:`mtpsl.data.layout.NYUV2_CLASSES` order;
the crop of the valid border (rows 44:471, columns 40:601, 0-based) and the resize to
288x384; depth in metres with 0 invalid; normals from the chosen source (:class:`Normals`).

Hypotheses (not verified against MTAN's release; ``mtpsl data diff OURS MTAN --match`` tests
each one on real files, see the README's data section):

- ``{i}.npy`` of a split is the i-th index of its splits.mat list (the lists are ascending);
- the crop above, then bilinear for the image (half-pixel centres, no antialiasing), nearest
  for labels and depth, bilinear and renormalised for normals (valid only where all four
  neighbours are);
- Eigen's normal PNGs decode as ``n = 2 v / 255 - 1`` per channel in file order, with the
  mask PNG's 0 = invalid.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mtpsl.core.errors import DataError
from mtpsl.data.prepare import geometry
from mtpsl.data.prepare.common import (
    STATE_DIR,
    PrepareRun,
    Summary,
    missing,
    progress_bar,
    sha256_file,
    write_bytes,
)

MAP_894_TO_40 = (
    "40,40,3,22,5,40,12,38,40,40,2,39,40,40,26,40,24,40,7,40,1,40,40,34,38,29,40,8,40,40,"
    "40,40,38,40,40,14,40,38,40,40,40,15,39,40,30,40,40,39,40,39,38,40,38,40,37,40,38,38,9,40,"
    "40,38,40,11,38,40,40,40,40,40,40,40,40,40,40,40,40,40,38,13,40,40,6,40,23,40,39,10,16,40,"
    "40,40,40,38,40,40,40,40,40,40,40,40,40,38,40,39,40,40,40,40,39,38,40,40,40,40,40,40,18,40,"
    "40,19,28,33,40,40,40,40,40,40,40,40,40,38,27,36,40,40,40,40,21,40,20,35,40,40,40,40,40,40,"
    "40,40,38,40,40,40,4,32,40,40,39,40,39,40,40,40,40,40,17,40,40,25,40,39,40,40,40,40,40,40,"
    "40,40,39,40,40,40,40,40,40,40,40,40,40,40,40,40,40,40,40,40,40,40,40,39,40,40,40,40,40,40,"
    "40,40,40,39,38,38,40,40,39,40,39,40,38,39,38,40,40,40,40,40,40,40,40,40,40,39,40,38,40,40,"
    "38,38,40,40,40,40,40,40,40,40,40,40,40,40,40,38,40,40,40,40,40,39,40,40,40,40,40,40,40,40,"
    "40,40,40,40,40,40,40,39,40,40,40,40,40,40,40,40,40,40,40,40,39,40,40,40,38,40,40,39,40,40,"
    "38,40,40,40,40,40,40,40,40,40,40,40,39,40,40,40,40,40,40,40,40,40,40,40,40,40,40,40,40,40,"
    "31,40,40,40,40,40,40,40,38,40,40,38,39,39,40,40,40,40,40,40,40,40,40,38,40,39,40,40,39,40,"
    "40,40,38,40,40,40,40,40,40,40,40,38,39,40,40,40,40,40,40,38,40,40,40,40,40,40,40,40,40,40,"
    "40,38,39,40,40,40,40,40,40,40,39,40,40,40,40,40,40,38,40,40,40,38,40,39,40,40,40,39,39,40,"
    "40,40,40,40,40,40,40,40,40,39,40,40,40,40,40,40,40,40,40,40,40,40,39,39,40,40,39,39,40,40,"
    "40,40,38,40,40,38,39,39,40,39,40,39,38,40,40,40,40,40,40,40,40,40,40,40,39,40,38,40,39,40,"
    "40,40,40,40,39,39,40,40,40,40,40,40,39,39,40,40,38,39,39,40,40,40,40,40,40,40,40,40,39,39,"
    "40,40,40,40,39,40,40,40,40,40,39,40,40,39,40,40,40,40,40,40,40,40,40,40,40,40,40,40,40,39,"
    "38,40,40,40,40,40,40,40,39,38,39,40,38,39,40,39,40,39,40,40,40,40,40,40,40,40,38,40,40,40,"
    "40,40,38,40,40,39,40,40,40,39,40,38,40,40,40,40,40,40,40,40,38,40,40,40,40,40,40,40,40,40,"
    "40,40,40,40,40,40,40,39,38,40,40,38,40,40,38,40,40,40,40,40,40,40,40,40,39,40,40,40,40,40,"
    "40,40,40,40,40,40,40,40,40,40,40,38,40,40,38,40,40,40,40,40,40,40,40,40,40,40,38,38,38,40,"
    "40,40,38,40,40,40,38,38,40,40,40,40,40,40,40,40,40,40,40,40,40,40,40,40,40,38,40,40,40,40,"
    "40,40,40,40,40,40,40,40,40,38,40,38,39,40,40,40,40,40,40,40,40,40,40,40,40,40,40,40,40,40,"
    "40,40,40,40,40,40,40,40,40,40,40,40,40,39,40,40,40,40,40,40,40,40,40,40,40,40,40,40,40,40,"
    "40,40,40,40,40,40,40,40,40,40,40,40,40,40,40,40,40,40,40,39,40,39,40,40,40,40,38,38,40,40,"
    "40,38,40,40,40,40,40,40,40,40,40,40,40,40,40,40,39,40,40,39,40,40,39,39,40,40,40,40,40,40,"
    "40,40,39,39,39,40,40,40,40,39,40,40,40,40,40,40,40,40,39,40,40,40,40,40,39,40,40,40,40,40,"
    "40,40,40,40,40,40,40,40,40,38,40,40,40,40,40,40,40,39,40,40,38,40,39,40,40,40,40,38,40,40,"
    "40,40,40,38,40,40,40,40,40,40,40,39,40,40,40,40,40,40,40,40,40,39,40,40,"
)
"""``mapClass`` of ``classMapping40.mat`` (Gupta et al. 2013; sha256 ff177194...d851): the
40-class id (1..40) of each raw NYUv2 class id 1..894, comma-separated in id order."""
MAP_40_TO_13 = (12, 5, 6, 1, 4, 9, 10, 12, 13, 6, 8, 6, 13, 10, 6, 13, 6, 7, 7, 5, 7, 3, 2, 6,
                11, 7, 7, 7, 7, 7, 7, 6, 7, 7, 7, 7, 7, 7, 6, 7)
"""``labels13`` of ``class13Mapping.mat``: the 13-class id (1..13) of each 40-class id 1..40."""
KINECT_RGB = (5.1885790117450188e02, 5.1946961112127485e02,
              3.2558244941119034e02 - 1, 2.5373616633400465e02 - 1)
"""fx, fy, cx, cy of the NYU toolbox's ``camera_params.m`` (RGB camera, to which the labelled
depth is registered), with the centre moved from MATLAB's 1-based to 0-based pixels."""
FROM_DEPTH_STEP = 6
"""Half-width in pixels (at 640 columns) of the depth differences of ``--normals from-depth``.
Measured on frame 433's raw depth against the published normals PNG of that frame (in the
axis order that fits best): median angle 34 degrees with 1 pixel, 17 with 4, 10.5 with 6."""
DEFAULT_CROP = (44, 471, 40, 601)
DEFAULT_SIZE = (288, 384)
SPLITS_SHA256 = "6e081404491a8bfba2f066beaa9713ef6046f9007aa5f799f2a350506a580cee"
SPLITS = {"train": "trainNdxs", "val": "testNdxs"}
"""Output split -> variable of splits.mat (MTAN's val is the official test split)."""
FOLDERS = ("image", "label", "depth", "normal")


def label_lut() -> np.ndarray:
    """Raw id 0..894 -> MTAN label -1..12 (raw 0, unlabelled, becomes -1)."""
    to40 = np.array([0, *(int(v) for v in "".join(MAP_894_TO_40).strip(",").split(","))])
    to13 = np.array([0, *MAP_40_TO_13])
    return to13[to40].astype(np.int64) - 1


# -- inputs -------------------------------------------------------------------------------
def _h5py():
    try:
        import h5py
    except ImportError:
        raise DataError("reading nyu_depth_v2_labeled.mat needs h5py: pip install "
                        "'mtpsl[prepare]' (or pip install h5py)") from None
    return h5py


def open_mat(path: Path) -> Any:
    """The labelled set as an open h5py file, its keys, shapes and dtypes checked."""
    if not path.is_file():
        raise missing(path, "the labelled NYUv2 .mat file", "nyu_depth_v2_labeled.mat")
    with open(path, "rb") as fp:
        head = fp.read(128)
    if head.startswith(b"MATLAB 5.0"):
        raise DataError(f"{path}: a MATLAB v5 .mat file; the official labelled set is MATLAB "
                        "v7.3 (HDF5): was it re-saved? use the file as downloaded")
    h5py = _h5py()
    try:
        f = h5py.File(path, "r", rdcc_nbytes=64 * 2**20)
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 (MATLAB v7.3) file, or cut short by an "
                        f"interrupted download ({exc})") from None
    try:
        need = {"images": (4, "u"), "depths": (3, "f"), "labels": (3, "u")}
        for key, (ndim, kind) in need.items():
            if key not in f:
                raise DataError(f"{path}: no dataset {key!r} (has {', '.join(sorted(f.keys()))}); "
                                "is this nyu_depth_v2_labeled.mat?")
            ds = f[key]
            if len(ds.shape) != ndim or ds.dtype.kind != kind:
                raise DataError(f"{path}: {key!r} is {ds.dtype}{tuple(ds.shape)}; expected "
                                f"{ndim} axes of {'unsigned int' if kind == 'u' else 'float'}")
        n, c, w, h = f["images"].shape
        if c != 3:
            raise DataError(f"{path}: 'images' has shape {f['images'].shape}; expected "
                            "(N, 3, W, H) as h5py shows MATLAB's H x W x 3 x N")
        for key in ("depths", "labels"):
            if tuple(f[key].shape) != (n, w, h):
                raise DataError(f"{path}: {key!r} has shape {f[key].shape}, 'images' "
                                f"{f['images'].shape}: expected ({n}, {w}, {h})")
    except BaseException:
        f.close()
        raise
    return f


def read_splits(path: Path, n: int) -> dict[str, np.ndarray]:
    """Output split -> 1-based image indices, as listed in splits.mat."""
    from scipy.io import loadmat

    if not path.is_file():
        raise missing(path, "the split file", "splits.mat")
    try:
        data = loadmat(path)
    except Exception as exc:
        raise DataError(f"{path}: cannot read .mat file ({exc})") from None
    out: dict[str, np.ndarray] = {}
    for split, key in SPLITS.items():
        if key not in data:
            have = sorted(k for k in data if not k.startswith("__"))
            raise DataError(f"{path}: no variable {key!r} (has {have}); is this splits.mat?")
        raw = np.asarray(data[key], dtype=np.float64).ravel()
        idx = raw.astype(np.int64)
        if raw.size == 0 or (raw != idx).any() or idx.min() < 1 or idx.max() > n:
            raise DataError(f"{path}: {key} must hold 1-based image indices 1..{n} (the .mat "
                            f"has {n} images), found {raw.min():g}..{raw.max():g}")
        if len(np.unique(idx)) != len(idx):
            raise DataError(f"{path}: {key} lists an image twice")
        out[split] = idx
    both = np.intersect1d(out["train"], out["val"])
    if both.size:
        raise DataError(f"{path}: images {both[:5].tolist()} are in both trainNdxs and testNdxs")
    return out


# -- normals ------------------------------------------------------------------------------
class Normals:
    """A source of full-resolution normals: ``read(g, depth)`` -> (unit vectors H x W x 3,
    valid H x W) of 0-based image ``g``."""

    kind: ClassVar[str] = ""
    inputs: list[tuple[str, Path]]
    out: Path = Path()
    needed: Sequence[int] = ()
    progress: bool = False
    _loaded: bool = False

    def check(self, needed: Sequence[int]) -> None:
        """Cheap checks before the run starts (and the final input list)."""

    def start(self, out: Path, needed: Sequence[int], progress: bool) -> None:
        """Where the run writes; heavy work waits for the first ``read`` (a rerun that finds
        every file made never unpacks an archive or unpickles gigabytes)."""
        self.out, self.needed, self.progress = out, needed, progress

    def _load(self) -> None:
        """Work before the first ``read`` (archive extraction, unpickling)."""

    def read(self, g: int, depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self._loaded:
            self._load()
            self._loaded = True
        return self._read(g, depth)

    def _read(self, g: int, depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class DepthNormals(Normals):
    """Computed from the in-painted depth and the Kinect RGB intrinsics (scaled to the
    frame's size), with differences over :data:`FROM_DEPTH_STEP` pixels; not the normals MTAN
    used, and noisier (no plane fitting)."""

    kind = "from-depth"

    def __init__(self) -> None:
        self.inputs = []

    def _read(self, g: int, depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w = depth.shape
        fx, fy, cx, cy = KINECT_RGB
        sx, sy = w / 640, h / 480
        return geometry.normals_from_depth(depth, fx * sx, fy * sy, (cx + 0.5) * sx - 0.5,
                                           (cy + 0.5) * sy - 0.5,
                                           step=max(1, round(FROM_DEPTH_STEP * sx)))


def _png(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: not a readable PNG ({exc})") from None


class EigenNormals(Normals):
    """Eigen & Fergus' ``normals_gt``: ``normals/{g:04d}.png`` (RGB) and ``masks/{g:04d}.png``
    (0 = invalid), ``g`` the 0-based image index; a folder, or the ``.tgz`` (extracted once
    into ``OUT/.prepare/``)."""

    kind = "eigen"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.archive = path.is_file()
        self.inputs = [(path.name, path)] if self.archive else []
        self.folder = path

    @staticmethod
    def _root(folder: Path) -> Path:
        for cand in (folder, folder / "normals_gt"):
            if (cand / "normals").is_dir() and (cand / "masks").is_dir():
                return cand
        raise DataError(f"{folder} holds no normals/ and masks/ folders (Eigen's normals_gt "
                        "layout: normals_gt/normals/0000.png, normals_gt/masks/0000.png)")

    def _extract(self, dest: Path, needed: set[str], progress: bool) -> None:
        done = dest / ".complete"
        if done.is_file():
            return
        try:
            with tarfile.open(self.path, "r:*") as tar, \
                    progress_bar(len(needed), "extracting normals", progress, "file") as bar:
                for member in tar:  # one sequential pass: a .tgz has no cheap random access
                    name = member.name.lstrip("./")
                    if not member.isfile() or name not in needed:
                        continue
                    src = tar.extractfile(member)
                    assert src is not None
                    data = src.read()
                    write_bytes(dest / name, data)
                    bar.update(1)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"{self.path}: not a readable tar archive, or cut short ({exc})") \
                from None
        write_bytes(done, b"")

    def _complete(self, folder: Path, needed: Sequence[int]) -> Path:
        root = self._root(folder)
        for g in needed:
            for sub in ("normals", "masks"):
                if not (root / sub / f"{g:04d}.png").is_file():
                    where = self.path if self.archive else root
                    raise DataError(f"{where} lacks {sub}/{g:04d}.png (image {g + 1} of the "
                                    "labelled set): an incomplete download or extraction")
        return root

    def check(self, needed: Sequence[int]) -> None:
        if not self.archive:
            self.folder = root = self._complete(self.path, needed)
            self.inputs = [(f"normals_gt/{sub}/{g:04d}.png", root / sub / f"{g:04d}.png")
                           for g in sorted(needed) for sub in ("normals", "masks")]

    def _load(self) -> None:
        if self.archive:
            names = {f"normals_gt/{sub}/{g:04d}.png" for g in self.needed
                     for sub in ("normals", "masks")}
            dest = self.out / STATE_DIR / "eigen"
            self._extract(dest, names, self.progress)
            self.folder = self._complete(dest, self.needed)

    def _read(self, g: int, depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rgb = _png(self.folder / "normals" / f"{g:04d}.png")
        mask = _png(self.folder / "masks" / f"{g:04d}.png")
        if rgb.ndim != 3 or rgb.shape[2] < 3 or rgb.shape[:2] != depth.shape:
            raise DataError(f"{self.folder / 'normals' / f'{g:04d}.png'}: expected an RGB image "
                            f"of {depth.shape[0]}x{depth.shape[1]}, got shape {rgb.shape}")
        if mask.shape[:2] != depth.shape:
            raise DataError(f"{self.folder / 'masks' / f'{g:04d}.png'}: expected "
                            f"{depth.shape[0]}x{depth.shape[1]}, got shape {mask.shape}")
        vec = 2.0 * rgb[..., :3].astype(np.float64) / 255.0 - 1.0
        valid = (mask if mask.ndim == 2 else mask[..., 0]) != 0
        norm = np.linalg.norm(vec, axis=-1)
        valid &= norm > 0
        return vec / np.maximum(norm, 1e-12)[..., None], valid


class _ArrayUnpickler(pickle.Unpickler):
    """Admits numpy arrays and plain containers only: a pickle that names anything else
    (code to run) is refused."""

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset({
        ("builtins", "dict"), ("builtins", "list"), ("builtins", "str"), ("builtins", "int"),
        ("builtins", "tuple"), ("builtins", "bytes"), ("__builtin__", "unicode"),
        ("_codecs", "encode"),  # how protocol 2 spells bytes (an array's buffer)
        ("numpy", "ndarray"), ("numpy", "dtype"), ("copy_reg", "_reconstructor"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


class FairNormals(Normals):
    """FAIR's ``all_normals.pklz`` (a gzip pickle: ``all_normals`` N x H x W x 3 float,
    ``all_filenames`` whose digits are the 1-based image index, optionally
    ``all_valid_depth_masks``), or the ``nyuv2_surfacenormal_metadata.zip`` holding it.
    Loaded whole (about 5 GB as float32): pickles cannot be streamed."""

    kind = "fair"
    MEMBER = "surfacenormal_metadata/all_normals.pklz"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.inputs = [(path.name, path)]
        self.normals: np.ndarray | None = None
        self.masks: np.ndarray | None = None
        self.index: dict[int, int] = {}

    def _unpickle(self) -> dict:
        try:
            if zipfile.is_zipfile(self.path):
                with zipfile.ZipFile(self.path) as zf:
                    if self.MEMBER not in zf.namelist():
                        raise DataError(f"{self.path}: the zip holds no {self.MEMBER}")
                    raw = gzip.decompress(zf.read(self.MEMBER))
            else:
                with gzip.open(self.path, "rb") as fp:
                    raw = fp.read()
            data = _ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()
        except DataError:
            raise
        except Exception as exc:  # gzip, zip and unpickling errors alike
            raise DataError(f"{self.path}: not a readable all_normals.pklz ({exc})") from None
        if not isinstance(data, dict) or "all_normals" not in data or \
                "all_filenames" not in data:
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise DataError(f"{self.path}: expected keys all_normals and all_filenames, got {keys}")
        return data

    def _load(self) -> None:
        needed = self.needed
        data = self._unpickle()
        normals = np.asarray(data["all_normals"])
        names = [str(n) for n in data["all_filenames"]]
        if normals.ndim != 4 or normals.shape[3] != 3 or len(names) != normals.shape[0]:
            raise DataError(f"{self.path}: all_normals has shape {normals.shape} for "
                            f"{len(names)} file names; expected (N, H, W, 3)")
        for k, name in enumerate(names):
            digits = "".join(ch for ch in name if ch.isdigit())
            if not digits:
                raise DataError(f"{self.path}: file name {name!r} holds no image number")
            self.index[int(digits) - 1] = k
        lacking = [g + 1 for g in needed if g not in self.index]
        if lacking:
            raise DataError(f"{self.path}: no normals for images {lacking[:10]} "
                            f"({len(lacking)} of {len(needed)} needed)")
        self.normals = normals
        masks = data.get("all_valid_depth_masks")
        self.masks = None if masks is None else np.asarray(masks)

    def _read(self, g: int, depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert self.normals is not None
        k = self.index[g]
        vec = self.normals[k].astype(np.float64)
        if vec.shape[:2] != depth.shape:
            raise DataError(f"{self.path}: normals of image {g + 1} are {vec.shape[:2]}, the "
                            f"image {depth.shape}")
        norm = np.linalg.norm(vec, axis=-1)
        valid = np.isfinite(norm) & (norm > 0)
        if self.masks is not None:
            valid &= self.masks[k] != 0
        vec = np.where(valid[..., None], vec, 0.0)
        return vec / np.maximum(norm, 1e-12)[..., None], valid


def normals_source(spec: str) -> Normals:
    """``from-depth``, an Eigen folder or ``.tgz``, or FAIR's ``.pklz`` / ``.zip``."""
    if spec == "from-depth":
        return DepthNormals()
    path = Path(spec)
    if not path.exists():
        raise missing(path, "the normals source", "normals_gt")
    if path.is_dir():
        return EigenNormals(path)
    if path.name.endswith((".pklz", ".pkl.gz")) or zipfile.is_zipfile(path):
        return FairNormals(path)
    if tarfile.is_tarfile(path):
        return EigenNormals(path)
    raise DataError(f"{path}: not a normals source (expected Eigen's normals_gt folder or "
                    ".tgz, FAIR's all_normals.pklz or its .zip, or from-depth)")


# -- the command ----------------------------------------------------------------------------
def _item(f: Any, g: int, normals: Normals, box: geometry.Box | None, size: geometry.Size,
          lut: np.ndarray, path: Path) -> dict[str, np.ndarray]:
    try:
        rgb = np.asarray(f["images"][g]).transpose(2, 1, 0)
        depth = np.asarray(f["depths"][g], dtype=np.float64).T
        raw = np.asarray(f["labels"][g]).T
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{path}: cannot read image {g + 1} ({exc}); the file may be cut "
                        "short") from None
    if raw.max(initial=0) >= len(lut):
        raise DataError(f"{path}: image {g + 1} has label {int(raw.max())}, above the "
                        f"{len(lut) - 1} NYUv2 classes")
    depth = np.where(np.isfinite(depth) & (depth > 0), depth, 0.0)
    vec, valid = normals.read(g, depth)
    image = geometry.resize_image(geometry.crop(rgb, box).astype(np.float64) / 255.0, size)
    label = geometry.resize_nearest(geometry.crop(lut[raw], box), size)
    depth_out = geometry.resize_nearest(geometry.crop(depth, box), size)
    normal = geometry.resize_normals(geometry.crop(vec, box), geometry.crop(valid, box), size)
    return {"image": np.clip(image, 0.0, 1.0).astype(np.float32),
            "label": label.astype(np.float32),
            "depth": depth_out[..., None].astype(np.float32),
            "normal": normal.astype(np.float32)}


def prepare_nyuv2(
    mat: Path,
    splits: Path,
    normals: str,
    out: Path,
    *,
    size: geometry.Size = DEFAULT_SIZE,
    crop: geometry.Box | None = DEFAULT_CROP,
    progress: bool = True,
    on_start: Callable[[str], None] | None = None,
) -> Summary:
    """Write ``OUT/{train,val}/{image,label,depth,normal}/{i}.npy`` (see the module docstring)."""
    source = normals_source(normals)
    notes: list[str] = []
    with open_mat(mat) as f:
        n, _, w, h = f["images"].shape
        order = read_splits(splits, n)
        if crop is not None and (crop[1] > h or crop[3] > w):
            raise DataError(f"crop {crop} does not fit the {h}x{w} images of {mat}")
        needed = sorted(int(g) - 1 for idx in order.values() for g in idx)
        source.check(needed)
        if sha256_file(splits) != SPLITS_SHA256:
            notes.append(f"note: {splits} is not the official splits.mat (sha256 differs): "
                         "the prepared splits are not MTAN's")
        crop_shape = (h, w) if crop is None else (crop[1] - crop[0], crop[3] - crop[2])
        options = {"size": list(size), "crop": None if crop is None else list(crop),
                   "normals": source.kind,
                   "resize": {"image": geometry.image_method(crop_shape, size),
                              "label": "nearest", "depth": "nearest",
                              "normal": "bilinear, renormalised, valid where all neighbours"}}
        libraries = ("numpy", "h5py", "scipy", "pillow")
        inputs = [(mat.name, mat), (splits.name, splits), *source.inputs]
        if on_start:
            on_start(f"nyuv2: {n} images in {mat.name}; {len(order['train'])} train, "
                     f"{len(order['val'])} val; normals {source.kind}")
        run = PrepareRun(out, "nyuv2", options, inputs, libraries=libraries, progress=progress)
        source.start(out, needed, progress)
        where = {int(g) - 1: (split, i) for split, idx in order.items()
                 for i, g in enumerate(idx)}
        lut = label_lut()
        with run.items(len(where), "nyuv2") as bar:
            for g in sorted(where):  # ascending in the file: the chunk cache stays warm
                split, i = where[g]
                names = {k: f"{split}/{k}/{i}.npy" for k in FOLDERS}
                if not run.done(names.values()):
                    arrays = _item(f, g, source, crop, size, lut, mat)
                    run.write({names[k]: arrays[k] for k in FOLDERS})
                bar.update(1)
    summary = run.finish({
        "splits": {split: {"images": len(idx), "source": f"{splits.name}:{SPLITS[split]}",
                           "order": [int(g) for g in idx]} for split, idx in order.items()},
        "labels": {"classes": 13, "void": -1, "maps": "894->40 classMapping40.mat mapClass, "
                   "40->13 class13Mapping.mat labels13, minus 1"},
        "hypotheses": [
            "{i}.npy of a split is the i-th index of the splits.mat list (order field)",
            "valid-border crop then resize: image per resize.image, labels and depth nearest, "
            "normals bilinear and renormalised",
            "Eigen normals: n = 2 v / 255 - 1 per channel in file order, mask 0 = invalid",
            "from-depth normals: camera frame x right, y down, z forward, facing the camera",
        ],
    })
    summary.notes.extend(notes)
    return summary
