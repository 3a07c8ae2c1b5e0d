"""Format-faithful miniatures of the official downloads, for the ``mtpsl data prepare`` tests.

- :func:`write_nyu_mat`: ``nyu_depth_v2_labeled.mat`` as MATLAB v7.3 writes it: HDF5 behind
  a 512-byte user block that starts with MATLAB's text header, every variable with its
  ``MATLAB_class`` attribute, the real keys (``#refs#``, ``#subsystem#``, cell arrays as
  object references) and h5py's reversed axes (``images`` ``(N, 3, W, H)`` uint8, ``depths``
  ``(N, W, H)`` float32, ``labels`` ``(N, W, H)`` uint16).
- :func:`write_splits`: ``splits.mat`` (MATLAB v5) with 1-based ``trainNdxs``/``testNdxs``
  columns of doubles.
- :func:`write_eigen`: Eigen's ``normals_gt/{normals,masks}/{g:04d}.png`` (0-based g), as a
  folder or a ``.tgz``; :func:`write_fair`: FAIR's gzip-pickled ``all_normals.pklz``.
- :func:`write_cityscapes`: ``leftImg8bit``/``gtFine``/``disparity``/``camera`` folders with
  the official file names, 16-bit disparity PNGs and camera JSON.
"""

from __future__ import annotations

import gzip
import json
import pickle
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MATLAB_HEADER = (b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Aug 13 12:00:00 2012 "
                 b"HDF5 schema 1.00 .")


def write_nyu_mat(path: Path, images: np.ndarray, depths: np.ndarray, labels: np.ndarray) -> Path:
    """``images`` (N,H,W,3) uint8, ``depths`` (N,H,W) metres, ``labels`` (N,H,W) 0..894, in
    the usual orientation; stored the way MATLAB stores them (seen reversed by h5py)."""
    import h5py

    n = len(images)
    with h5py.File(path, "w", userblock_size=512, libver="earliest") as f:
        refs = f.create_group("#refs#")
        name = refs.create_dataset("a", data=np.frombuffer(b"wall", np.uint8).astype(np.uint16)
                                   .reshape(-1, 1))
        name.attrs["MATLAB_class"] = np.bytes_(b"char")
        f.create_group("#subsystem#").create_dataset("MCOS", data=np.zeros((1, 4), np.uint32))

        def var(key: str, data: np.ndarray, cls: str) -> None:
            ds = f.create_dataset(key, data=data, chunks=True, compression="gzip",
                                  compression_opts=1)
            ds.attrs["MATLAB_class"] = np.bytes_(cls.encode())

        var("images", images.transpose(0, 3, 2, 1).astype(np.uint8), "uint8")
        var("depths", depths.transpose(0, 2, 1).astype(np.float32), "single")
        var("rawDepths", depths.transpose(0, 2, 1).astype(np.float32), "single")
        var("labels", labels.transpose(0, 2, 1).astype(np.uint16), "uint16")
        var("instances", np.zeros_like(labels.transpose(0, 2, 1), dtype=np.uint8), "uint8")
        var("accelData", np.zeros((4, n), np.float32), "single")
        ref_dtype = h5py.special_dtype(ref=h5py.Reference)
        for key, count in (("names", 894), ("sceneTypes", n), ("scenes", n),
                           ("rawRgbFilenames", n), ("rawDepthFilenames", n)):
            ds = f.create_dataset(key, (1, count), dtype=ref_dtype)
            ds[...] = name.ref
            ds.attrs["MATLAB_class"] = np.bytes_(b"cell")
        ds = f.create_dataset("namesToIds", data=np.zeros((1, 6), np.uint32))
        ds.attrs["MATLAB_class"] = np.bytes_(b"containers.Map")
    with open(path, "r+b") as fp:  # MATLAB's 128-byte header at the start of the user block
        fp.write(MATLAB_HEADER.ljust(116) + bytes(8) + b"\x00\x02" + b"IM")
    return path


def write_splits(path: Path, train: Sequence[int], test: Sequence[int]) -> Path:
    from scipy.io import savemat

    savemat(path, {"trainNdxs": np.asarray(train, float).reshape(-1, 1),
                   "testNdxs": np.asarray(test, float).reshape(-1, 1)})
    return path


def nyu_arrays(n: int, seed: int = 0, h: int = 480, w: int = 640):
    """Random images, depths (with a few holes) and raw labels (0..894) of n frames."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    depths = rng.uniform(0.5, 9.5, (n, h, w)).astype(np.float32)
    depths[rng.random((n, h, w)) < 0.02] = 0.0
    labels = rng.integers(0, 895, (n, h, w)).astype(np.uint16)
    return images, depths, labels


def write_eigen(root: Path, n: int, seed: int = 1, h: int = 480, w: int = 640,
                archive: bool = False) -> tuple[Path, np.ndarray, np.ndarray]:
    """normals_gt for global indices 0..n-1; returns (folder or .tgz, RGB codes, masks)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    masks = np.zeros((n, h, w), bool)
    masks[:, 60:440, 80:560] = True  # an invalid border wider than the crop
    masks &= rng.random((n, h, w)) > 0.05
    folder = root / "normals_gt"
    for sub in ("normals", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for g in range(n):
        Image.fromarray(codes[g]).save(folder / "normals" / f"{g:04d}.png")
        Image.fromarray(masks[g]).save(folder / "masks" / f"{g:04d}.png")  # mode "1": boolean
    if not archive:
        return folder, codes, masks
    tgz = root / "normals_gt.tgz"
    with tarfile.open(tgz, "w:gz", compresslevel=1) as tar:
        tar.add(folder, arcname="normals_gt")
    return tgz, codes, masks


def write_fair(path: Path, normals: np.ndarray, masks: np.ndarray | None = None) -> Path:
    data = {"all_normals": normals.astype(np.float32),
            "all_filenames": [f"{g + 1:06d}" for g in range(len(normals))]}
    if masks is not None:
        data["all_valid_depth_masks"] = masks.astype(np.uint8)
    with gzip.open(path, "wb", compresslevel=1) as fp:
        pickle.dump(data, fp, protocol=2)
    return path


CAMERA = {"extrinsic": {"baseline": 0.209313, "pitch": 0.038, "roll": 0.0, "x": 1.7, "y": 0.1,
                        "yaw": -0.0195, "z": 1.22},
          "intrinsic": {"fx": 2262.52, "fy": 2265.3017905988554, "u0": 1096.98, "v0": 513.137}}


def write_cityscapes(root: Path, frames: dict[str, dict[str, list[str]]], h: int = 64,
                     w: int = 128, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """``frames[split][city] = [stems]``; returns ``{stem: {rgb, ids, disp, camera}}``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, np.ndarray]] = {}
    for split, cities in frames.items():
        for city, stems in cities.items():
            for stem in stems:
                rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                ids = rng.integers(0, 34, (h, w)).astype(np.uint8)
                disp = rng.integers(0, 32258, (h, w)).astype(np.uint16)
                disp[:3] = 0  # invalid rows (ego car, sky)
                disp[3, :4] = 1  # zero disparity
                cam = json.loads(json.dumps(CAMERA))
                cam["extrinsic"]["baseline"] = round(0.2 + 0.01 * len(out), 6)
                paths = {
                    "leftImg8bit": f"{stem}_leftImg8bit.png",
                    "gtFine": f"{stem}_gtFine_labelIds.png",
                    "disparity": f"{stem}_disparity.png",
                    "camera": f"{stem}_camera.json",
                }
                for pkg in paths:
                    (root / pkg / split / city).mkdir(parents=True, exist_ok=True)
                base = {k: root / k / split / city / v for k, v in paths.items()}
                Image.fromarray(rgb).save(base["leftImg8bit"])
                Image.fromarray(ids).save(base["gtFine"])
                Image.fromarray(disp).save(base["disparity"])  # 16-bit grey
                base["camera"].write_text(json.dumps(cam, indent=2))
                out[stem] = {"rgb": rgb, "ids": ids, "disp": disp,
                             "camera": np.array([cam["extrinsic"]["baseline"],
                                                 cam["intrinsic"]["fx"]])}
    return out
