"""``mtpsl data prepare`` and ``mtpsl data diff`` on format-faithful miniatures of the official
downloads (``tests/prepare_inputs.py``), checked value by value against hand computations: the
published class maps, the disparity formulas, crop and resize redone in plain numpy.

Also: a prepare killed mid-way (SIGKILL through ``MTPSL_FAULT``) and run again gives a tree and
manifest byte-identical to an uninterrupted run's; every prepared output passes ``mtpsl data
check`` and trains one epoch; bad inputs fail with one line naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mtpsl.cli import main
from mtpsl.core.errors import DataError
from mtpsl.data.prepare import geometry
from prepare_inputs import (
    nyu_arrays,
    write_cityscapes,
    write_eigen,
    write_fair,
    write_nyu_mat,
    write_splits,
)

from conftest import TINY_TRAIN, final_metrics, mtpsl_process, train_cli

h5py = pytest.importorskip("h5py")

# the 40 -> 13 map as published (howard-mahe/nyudv2_class_mapping, class13Mapping.mat)
PUBLISHED_40_TO_13 = [12, 5, 6, 1, 4, 9, 10, 12, 13, 6, 8, 6, 13, 10, 6, 13, 6, 7, 7, 5, 7, 3, 2,
                      6, 11, 7, 7, 7, 7, 7, 7, 6, 7, 7, 7, 7, 7, 7, 6, 7]
# cityscapesScripts' labels.py: labelId -> trainId (all others 255 = ignore)
TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
             25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CATEGORY = {**dict.fromkeys(range(7), 0), **dict.fromkeys(range(7, 11), 1),
            **dict.fromkeys(range(11, 17), 2), **dict.fromkeys(range(17, 21), 3), 21: 4, 22: 4,
            23: 5, 24: 6, 25: 6, **dict.fromkeys(range(26, 34), 7)}
CROP = (44, 471, 40, 601)
N_NYU = 5
TRAIN_NDX, TEST_NDX = [4, 2], [1, 3, 5]  # 1-based, and train deliberately not ascending


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _sample_index(n_in: int, n_out: int) -> np.ndarray:
    """Nearest-neighbour source index, as the float formula says it (floor of the centre)."""
    return np.floor((np.arange(n_out) + 0.5) * n_in / n_out).astype(int)


def _bilinear_at(src: np.ndarray, size: tuple[int, int], r: int, c: int) -> np.ndarray:
    """One output pixel of a half-pixel bilinear resize, written out longhand."""
    def axis(j: int, n_in: int, n_out: int) -> tuple[int, int, float]:
        x = min(max((j + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1.0)
        lo = int(np.floor(x))
        return lo, min(lo + 1, n_in - 1), x - lo

    y0, y1, wy = axis(r, src.shape[0], size[0])
    x0, x1, wx = axis(c, src.shape[1], size[1])
    return ((1 - wy) * ((1 - wx) * src[y0, x0] + wx * src[y0, x1])
            + wy * ((1 - wx) * src[y1, x0] + wx * src[y1, x1]))


@pytest.fixture(scope="module")
def nyu(tmp_path_factory) -> dict:
    """A 5-frame labelled .mat at the real 480x640, its splits.mat and Eigen normals."""
    base = tmp_path_factory.mktemp("nyu")
    images, depths, labels = nyu_arrays(N_NYU)
    mat = write_nyu_mat(base / "nyu_depth_v2_labeled.mat", images, depths, labels)
    splits = write_splits(base / "splits.mat", TRAIN_NDX, TEST_NDX)
    eigen, codes, masks = write_eigen(base, N_NYU)
    return dict(base=base, mat=mat, splits=splits, eigen=eigen, codes=codes, masks=masks,
                images=images, depths=depths, labels=labels)


@pytest.fixture(scope="module")
def nyu_out(nyu, tmp_path_factory) -> Path:
    """The miniature prepared at the default 288x384 with Eigen's normals."""
    from mtpsl.data.prepare.nyuv2 import prepare_nyuv2

    out = tmp_path_factory.mktemp("nyu-out") / "nyuv2"
    prepare_nyuv2(nyu["mat"], nyu["splits"], str(nyu["eigen"]), out, progress=False)
    return out


# -- NYUv2 ---------------------------------------------------------------------------------
def test_nyuv2_class_map_is_the_published_one():
    from mtpsl.data.layout import NYUV2_CLASSES
    from mtpsl.data.prepare.nyuv2 import MAP_40_TO_13, label_lut

    assert list(MAP_40_TO_13) == PUBLISHED_40_TO_13
    lut = label_lut()
    assert lut.shape == (895,) and lut[0] == -1 and set(lut[1:]) == set(range(13))
    # raw ids of the NYUv2 name list (nyu_classes.json) -> the 13 classes a reader expects
    named = {21: "wall", 11: "floor", 4: "ceiling", 5: "chair", 157: "bed", 85: "books",
             59: "window", 83: "sofa", 19: "table", 172: "tv", 64: "picture", 3: "furniture"}
    assert {raw: NYUV2_CLASSES[lut[raw]] for raw in named} == named


def test_nyuv2_values_by_hand(nyu, nyu_out):
    from mtpsl.data.prepare.nyuv2 import label_lut

    rows = CROP[0] + _sample_index(CROP[1] - CROP[0], 288)
    cols = CROP[2] + _sample_index(CROP[3] - CROP[2], 384)
    lut40 = label_lut()
    rng = np.random.default_rng(0)
    for split, ndx in (("train", TRAIN_NDX), ("val", TEST_NDX)):
        for i, g1 in enumerate(ndx):
            g = g1 - 1  # splits.mat is 1-based; {i}.npy follows the list's order
            load = {k: np.load(nyu_out / split / k / f"{i}.npy")
                    for k in ("image", "label", "depth", "normal")}
            assert load["image"].shape == (288, 384, 3) and load["image"].dtype == np.float32
            assert load["depth"].shape == (288, 384, 1) and load["label"].shape == (288, 384)
            expected_label = lut40[nyu["labels"][g]][np.ix_(rows, cols)]
            assert (load["label"] == expected_label).all()
            expected_depth = nyu["depths"][g][np.ix_(rows, cols)]
            assert (load["depth"][..., 0] == expected_depth).all()
            crop_img = nyu["images"][g][CROP[0]:CROP[1], CROP[2]:CROP[3]] / 255.0
            crop_n = nyu["codes"][g][CROP[0]:CROP[1], CROP[2]:CROP[3]] / 127.5 - 1
            crop_n /= np.linalg.norm(crop_n, axis=-1, keepdims=True)
            crop_m = nyu["masks"][g][CROP[0]:CROP[1], CROP[2]:CROP[3]]
            for r, c in rng.integers(0, (288, 384), size=(40, 2)):
                assert np.allclose(load["image"][r, c], _bilinear_at(crop_img, (288, 384), r, c),
                                   atol=1e-6)
                all_valid = _bilinear_at(crop_m.astype(float), (288, 384), r, c) == 1.0
                vec = _bilinear_at(crop_n * crop_m[..., None], (288, 384), r, c)
                want = vec / np.linalg.norm(vec) if all_valid else np.zeros(3)
                assert np.allclose(load["normal"][r, c], want, atol=1e-5)
    # the label of a void pixel is -1; the masks' invalid border gives all-zero normals
    assert (np.load(nyu_out / "val/normal/0.npy")[0] == 0).all()


def test_nyuv2_manifest_records_inputs_order_and_hypotheses(nyu, nyu_out):
    manifest = json.loads((nyu_out / "prepare.json").read_text())
    assert manifest["dataset"] == "nyuv2" and manifest["options"]["crop"] == list(CROP)
    assert manifest["splits"]["train"]["order"] == TRAIN_NDX
    assert manifest["splits"]["val"]["order"] == TEST_NDX
    assert manifest["hypotheses"] and manifest["tool"]["mtpsl"]
    inputs = (nyu_out / "prepare.inputs.sha256").read_text().splitlines()
    assert inputs[0].endswith("  normals_gt/masks/0000.png") and len(inputs) == 2 + 2 * N_NYU
    listing = (nyu_out / "prepare.files.sha256").read_text()
    assert len(listing.splitlines()) == 4 * N_NYU
    import hashlib
    assert manifest["output"]["sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    for line in listing.splitlines():  # sha256sum -c would pass
        digest, name = line.split("  ")
        assert hashlib.sha256((nyu_out / name).read_bytes()).hexdigest() == digest
    assert not (nyu_out / ".prepare").exists()


def test_nyuv2_eigen_archive_and_fair_give_the_same_normals(nyu, nyu_out, tmp_path):
    from mtpsl.data.prepare.nyuv2 import prepare_nyuv2

    tgz, _, _ = write_eigen(tmp_path / "a", N_NYU, archive=True)
    out = tmp_path / "from-tgz"
    prepare_nyuv2(nyu["mat"], nyu["splits"], str(tgz), out, size=(288, 384), progress=False)
    for i in range(3):
        assert (np.load(out / f"val/normal/{i}.npy")
                == np.load(nyu_out / f"val/normal/{i}.npy")).all()
    vec = 2 * nyu["codes"].astype(np.float64) / 255 - 1
    vec /= np.linalg.norm(vec, axis=-1, keepdims=True)
    pklz = write_fair(tmp_path / "all_normals.pklz", vec, nyu["masks"])
    fair = tmp_path / "fair"
    prepare_nyuv2(nyu["mat"], nyu["splits"], str(pklz), fair, progress=False)
    got, want = np.load(fair / "val/normal/1.npy"), np.load(nyu_out / "val/normal/1.npy")
    assert ((got == 0).all(-1) == (want == 0).all(-1)).all()
    assert np.allclose(got, want, atol=1e-5)  # float32 storage of the vectors in the pickle


def test_fair_pickle_that_runs_code_is_refused(tmp_path):
    import gzip
    import pickle

    from mtpsl.data.prepare.nyuv2 import FairNormals

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    path = tmp_path / "all_normals.pklz"
    with gzip.open(path, "wb") as fp:
        pickle.dump({"all_normals": Evil(), "all_filenames": []}, fp)
    with pytest.raises(DataError, match="refusing to unpickle"):
        source = FairNormals(path)
        source.start(tmp_path, [0], False)
        source.read(0, np.zeros((4, 4)))


def test_normals_from_depth_of_a_plane():
    fx, fy, cx, cy = 500.0, 510.0, 31.5, 23.5
    plane = np.array([0.3, -0.5, 1.0])  # points P with plane . P = 2
    v, u = np.mgrid[0:48, 0:64].astype(float)
    ray = np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u)], -1)
    depth = 2.0 / (ray @ plane)
    want = -plane / np.linalg.norm(plane)  # facing the camera: n . P < 0
    for k in (1, 3):
        normal, valid = geometry.normals_from_depth(depth, fx, fy, cx, cy, step=k)
        assert valid[k:-k, k:-k].all() and not valid[:k].any() and not valid[:, -k:].any()
        assert np.allclose(normal[k:-k, k:-k], want, atol=1e-9)
        assert (normal[~valid] == 0).all()


def test_resize_rules_against_numpy():
    rng = np.random.default_rng(3)
    a = rng.random((64, 128, 3))
    area = geometry.resize_area(a, (8, 16))
    assert np.allclose(area[2, 5], a[16:24, 40:48].mean(axis=(0, 1)))
    assert (geometry.resize_nearest(a, (24, 40)) == a[np.ix_(_sample_index(64, 24),
                                                              _sample_index(128, 40))]).all()
    assert np.allclose(geometry.resize_bilinear(a, (64, 128)), a)  # identity
    assert geometry.image_method((1024, 2048), (128, 256)) == "area"
    assert geometry.image_method((427, 561), (288, 384)) == "bilinear"


# -- resumability -------------------------------------------------------------------------
def _prepare_argv(nyu: dict, out: Path) -> list[str]:
    return ["data", "prepare", "nyuv2", "--mat", str(nyu["mat"]), "--splits",
            str(nyu["splits"]), "--normals", "from-depth", "--out", str(out), "--size", "32x64"]


def test_rerun_remakes_only_damaged_files(nyu, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_prepare_argv(nyu, out)) == 0
    first = _tree(out)
    printed = capsys.readouterr().out
    assert f"to {out}" in printed and "prepare.json" in printed and "tree sha256" in printed
    (out / "train/depth/1.npy").unlink()
    (out / "val/image/2.npy").write_bytes(first["val/image/2.npy"][:-4] + b"\0\0\0\0")
    assert main(_prepare_argv(nyu, out)) == 0
    assert "2 items made, 3 already there and verified" in capsys.readouterr().out
    assert _tree(out) == first


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["KILL@prepare:item#2", "KILL@write:1.npy#2"])
def test_killed_prepare_resumes_to_a_byte_identical_tree(nyu, tmp_path, fault):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert main(_prepare_argv(nyu, clean)) == 0
    proc = mtpsl_process(*_prepare_argv(nyu, killed), fault=fault)
    assert proc.returncode == -9, proc.stderr
    assert (killed / ".prepare" / "journal.jsonl").is_file()
    assert not (killed / "prepare.json").exists()
    proc = mtpsl_process(*_prepare_argv(nyu, killed))
    assert proc.returncode == 0, proc.stderr
    assert _tree(killed) == _tree(clean)  # every file, prepare.json and the listings included


# -- errors --------------------------------------------------------------------------------
def test_missing_official_files_say_where_they_come_from(nyu, tmp_path, capsys):
    argv = _prepare_argv(nyu, tmp_path / "o")
    argv[argv.index("--mat") + 1] = str(tmp_path / "nyu_depth_v2_labeled.mat")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "nyu_depth_v2_labeled.mat does not exist" in err and "horatio.cs.nyu.edu" in err
    argv = _prepare_argv(nyu, tmp_path / "o")
    argv[argv.index("--normals") + 1] = str(tmp_path / "normals_gt")
    assert main(argv) == 2
    assert "deigen/dnl/normals_gt.tgz" in capsys.readouterr().err
    assert main(["data", "prepare", "cityscapes", "--root", str(tmp_path / "cs"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "cityscapes-dataset.com" in capsys.readouterr().err


def test_bad_nyu_inputs_fail_naming_the_file(nyu, tmp_path):
    from scipy.io import savemat

    from mtpsl.data.prepare.nyuv2 import prepare_nyuv2, read_splits

    cut = tmp_path / "cut.mat"
    cut.write_bytes(nyu["mat"].read_bytes()[: 2**20])
    with pytest.raises(DataError, match=r"cut\.mat: not a readable HDF5.*cut short"):
        prepare_nyuv2(cut, nyu["splits"], "from-depth", tmp_path / "o", progress=False)
    v5 = tmp_path / "v5.mat"
    savemat(v5, {"images": np.zeros((2, 2))})
    with pytest.raises(DataError, match=r"v5\.mat: a MATLAB v5"):
        prepare_nyuv2(v5, nyu["splits"], "from-depth", tmp_path / "o", progress=False)
    nokey = tmp_path / "nokey.mat"
    with h5py.File(nokey, "w") as f:
        f["images"] = np.zeros((1, 3, 8, 6), np.uint8)
    with pytest.raises(DataError, match=r"nokey\.mat: no dataset 'depths'"):
        prepare_nyuv2(nokey, nyu["splits"], "from-depth", tmp_path / "o", progress=False)
    zero_based = write_splits(tmp_path / "s0.mat", [0, 1], [2, 3, 4])
    with pytest.raises(DataError, match=r"s0\.mat: trainNdxs must hold 1-based"):
        read_splits(zero_based, N_NYU)
    overlap = write_splits(tmp_path / "s1.mat", [1, 2], [2, 3])
    with pytest.raises(DataError, match=r"in both trainNdxs and testNdxs"):
        read_splits(overlap, N_NYU)
    (nyu["eigen"] / "masks" / "0002.png").rename(tmp_path / "moved.png")
    try:
        with pytest.raises(DataError, match=r"lacks masks/0002\.png \(image 3 of"):
            prepare_nyuv2(nyu["mat"], nyu["splits"], str(nyu["eigen"]), tmp_path / "o",
                          progress=False)
    finally:
        (tmp_path / "moved.png").rename(nyu["eigen"] / "masks" / "0002.png")


def test_output_folder_guards(nyu, tmp_path):
    from mtpsl.data.prepare.nyuv2 import prepare_nyuv2

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("mine")
    with pytest.raises(DataError, match="is not empty and was not made by mtpsl"):
        prepare_nyuv2(nyu["mat"], nyu["splits"], "from-depth", foreign, progress=False)
    out = tmp_path / "out"
    prepare_nyuv2(nyu["mat"], nyu["splits"], "from-depth", out, size=(32, 64), progress=False)
    with pytest.raises(DataError, match="already holds a prepared copy made from other"):
        prepare_nyuv2(nyu["mat"], nyu["splits"], "from-depth", out, size=(64, 64),
                      progress=False)


# -- Cityscapes ----------------------------------------------------------------------------
FRAMES = {"train": {"zurich": ["zurich_000000_000019"],
                    "aachen": ["aachen_000001_000019", "aachen_000000_000019"]},
          "val": {"lindau": ["lindau_000000_000019"]}}
ORDER = {"train": ["aachen_000000_000019", "aachen_000001_000019", "zurich_000000_000019"],
         "val": ["lindau_000000_000019"]}


@pytest.fixture(scope="module")
def city(tmp_path_factory) -> dict:
    pytest.importorskip("cityscapesscripts")
    root = tmp_path_factory.mktemp("cityscapes")
    return {"root": root, "frames": write_cityscapes(root, FRAMES)}


def test_cityscapes_label_table_is_the_published_one():
    pytest.importorskip("cityscapesscripts")
    from mtpsl.data.prepare.cityscapes import label_tables

    to19, to7 = label_tables("trainid")
    for label_id in range(34):
        assert to19[label_id] == TRAIN_IDS.get(label_id, -1)
        want7 = CATEGORY[label_id] - 1 if label_id in TRAIN_IDS else -1
        assert to7[label_id] == want7
    _, cat7 = label_tables("category")
    assert [cat7[i] for i in (0, 6, 9, 14, 29)] == [-1, -1, 0, 1, 6]  # parking, guard rail...
    assert (to19[34:] == -2).all()


@pytest.mark.parametrize("depth", ["mtan", "pixels", "metric"])
def test_cityscapes_values_by_hand(city, tmp_path, depth):
    from mtpsl.data.prepare.cityscapes import prepare_cityscapes

    out = tmp_path / depth
    summary = prepare_cityscapes(city["root"], out, size=(32, 64), depth=depth, progress=False)
    assert any("2975" in note for note in summary.notes)  # a subset of the release
    manifest = json.loads((out / "prepare.json").read_text())
    assert {s: manifest["splits"][s]["order"] for s in ORDER} == ORDER
    assert manifest["splits"]["train"]["cities"] == [["aachen", 2], ["zurich", 1]]
    rows, cols = _sample_index(64, 32), _sample_index(128, 64)
    for split, stems in ORDER.items():
        for i, stem in enumerate(stems):
            src = city["frames"][stem]
            ids = src["ids"][np.ix_(rows, cols)]
            label19 = np.load(out / split / "label_19" / f"{i}.npy")
            label7 = np.load(out / split / "label_7" / f"{i}.npy")
            assert (label19 == np.vectorize(lambda x: TRAIN_IDS.get(x, -1))(ids)).all()
            assert (label7 == np.vectorize(
                lambda x: CATEGORY[x] - 1 if x in TRAIN_IDS else -1)(ids)).all()
            image = np.load(out / split / "image" / f"{i}.npy")
            assert np.allclose(image[5, 7], src["rgb"][10:12, 14:16].mean((0, 1)) / 255)
            p = src["disp"][np.ix_(rows, cols)].astype(np.float64)
            d = np.where(p > 0, (p - 1) / 256, 0)
            want = {"mtan": p / 65535, "pixels": d * 64 / 128,
                    "metric": np.where(d > 0, src["camera"][0] * src["camera"][1]
                                       / np.maximum(d, 1e-12), 0)}[depth]
            got = np.load(out / split / "depth" / f"{i}.npy")
            assert got.shape == (32, 64, 1)
            assert np.allclose(got[..., 0], want, rtol=1e-6)
            assert (got[:1] == 0).all()  # p = 0 rows stay invalid
    if depth == "mtan":  # the check the README gives users: v * 65535 is an integer
        v = np.load(out / "train/depth/0.npy").astype(np.float64)
        assert np.abs(v * 65535 - np.round(v * 65535)).max() < 1e-3


def test_cityscapes_incomplete_and_wrong_inputs(city, tmp_path):
    import shutil

    from mtpsl.data.prepare.cityscapes import prepare_cityscapes

    root = tmp_path / "cs"
    shutil.copytree(city["root"], root)
    missing = root / "disparity/train/zurich/zurich_000000_000019_disparity.png"
    missing.unlink()
    with pytest.raises(DataError, match=r"zurich_000000_000019_disparity\.png does not exist "
                       r"\(1 of 3 train disparity.*disparity_trainvaltest\.zip"):
        prepare_cityscapes(root, tmp_path / "o", size=(32, 64), progress=False)
    from PIL import Image

    Image.fromarray(np.zeros((64, 128), np.uint8)).save(missing)  # 8-bit, not 16-bit
    with pytest.raises(DataError, match=r"_disparity\.png: expected a 16-bit disparity PNG"):
        prepare_cityscapes(root, tmp_path / "o2", size=(32, 64), progress=False)
    shutil.rmtree(root / "camera")
    with pytest.raises(DataError, match=r"camera does not exist.*camera_trainvaltest"):
        prepare_cityscapes(root, tmp_path / "o3", size=(32, 64), depth="metric",
                           progress=False)


# -- PASCAL-Context ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pascal(tmp_path_factory) -> Path:
    from mtpsl.data.synthetic import write_pascal_layout

    return write_pascal_layout(tmp_path_factory.mktemp("pascal") / "PASCAL_MT", n_train=4,
                               n_val=2, height=32, width=48, progress=False)


def test_pascal_parts_lists_are_the_benchmarks(pascal, capsys):
    from scipy.io import loadmat

    assert main(["data", "prepare", "pascal_context", "--root", str(pascal)]) == 0
    printed = capsys.readouterr().out
    assert "train: images 4, semantic 4" in printed and "prepare.json" in printed
    for split in ("train", "val"):
        ids = (pascal / "ImageSets/Context" / f"{split}.txt").read_text().split()
        entries = []
        for image_id in ids:
            path = pascal / "human_parts" / f"{image_id}.mat"
            if not path.is_file():
                continue
            objects = np.atleast_1d(loadmat(path, squeeze_me=True, struct_as_record=False)
                                    ["anno"].objects)
            cats = [int(o.class_ind) if np.sum(o.mask) > 0 else -1 for o in objects]
            entries.append(f'\t"{image_id}": [{", ".join(map(str, cats))}]')
        want = "{\n" + ",\n".join(entries) + "\n}\n"
        assert (pascal / "ImageSets/Parts" / f"{split}.txt").read_text() == want
        assert json.loads(want)  # valid JSON, as the benchmark json.load()s it
    manifest = json.loads((pascal / "prepare.json").read_text())
    assert len(manifest["dataset_options"]["normal_classes"]) == 170
    assert manifest["splits"]["train"]["images"] == 4
    before = _tree(pascal)
    assert main(["data", "prepare", "pascal_context", "--root", str(pascal)]) == 0
    assert _tree(pascal) == before
    assert main(["data", "check", "--root", str(pascal), "--dataset", "pascal_context"]) == 0


# -- check, train and diff -----------------------------------------------------------------
@pytest.mark.slow
def test_prepared_copies_pass_check_and_train_one_epoch(nyu, city, pascal, tmp_path):
    nyu_root = tmp_path / "nyuv2"
    assert main(_prepare_argv(nyu, nyu_root)) == 0
    city_root = tmp_path / "cityscapes"
    assert main(["data", "prepare", "cityscapes", "--root", str(city["root"]), "--out",
                 str(city_root), "--size", "32x64"]) == 0
    assert main(["data", "prepare", "pascal_context", "--root", str(pascal)]) == 0
    for root, name in ((nyu_root, "nyuv2"), (city_root, "cityscapes"),
                       (pascal, "pascal_context")):
        for split in ("train", "val"):
            assert main(["data", "check", "--root", str(root), "--dataset", name,
                         "--split", split]) == 0
    train_cli(tmp_path / "run-nyu", nyu_root, *TINY_TRAIN, "train.device=cpu")
    train_cli(tmp_path / "run-city", city_root, *TINY_TRAIN, "train.device=cpu",
              "dataset.name=cityscapes")
    train_cli(tmp_path / "run-pascal", pascal, *TINY_TRAIN, "train.device=cpu",
              "dataset.options.size=[32,48]", config="synthetic_table3")
    for run in ("run-nyu", "run-city", "run-pascal"):
        assert final_metrics(tmp_path / run)


def test_diff_reports_agreement_missing_files_and_order(nyu, tmp_path, capsys):
    import shutil

    from mtpsl.data.prepare.diff import diff_layouts

    a = tmp_path / "a"
    assert main(_prepare_argv(nyu, a)) == 0
    b = tmp_path / "b"
    shutil.copytree(a, b)
    same = diff_layouts(a, b)["splits"]["val"]["folders"]
    assert same["image"]["identical"] == 3 and same["label"]["agreement"] == 1.0
    assert same["depth"]["mae"] == 0 and same["normal"]["mean_angle_deg"] < 1e-3
    label = np.load(b / "val/label/1.npy")
    label[:16] = np.where(label[:16] >= 0, (label[:16] + 1) % 13, label[:16])
    np.save(b / "val/label/1.npy", label)
    depth = np.load(b / "val/depth/0.npy")
    np.save(b / "val/depth/0.npy", depth * 2)
    (b / "val/normal/2.npy").unlink()
    assert main(["data", "diff", str(a), str(b), "--json", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert "files only in A: 1 (2)" in printed and f"wrote the full report to {tmp_path}" in printed
    report = json.loads((tmp_path / "r.json").read_text())["splits"]["val"]["folders"]
    both = (np.load(a / "val/label/1.npy") >= 0).sum()
    changed = (np.load(a / "val/label/1.npy")[:16] >= 0).sum()
    total_labelled = sum((np.load(a / f"val/label/{i}.npy") >= 0).sum() for i in range(3))
    assert report["label"]["agreement"] == pytest.approx(1 - changed / total_labelled)
    assert both > changed
    assert report["depth"]["ratio_median"] == 1.0  # two of three images unchanged
    assert report["normal"]["only_a"] == [2]
    # the same images in another order: --match pairs them up again
    c = tmp_path / "c"
    shutil.copytree(a, c)
    for folder in ("image", "label", "depth", "normal"):
        f = c / "val" / folder
        (f / "0.npy").rename(f / "tmp.npy")
        (f / "2.npy").rename(f / "0.npy")
        (f / "tmp.npy").rename(f / "2.npy")
    matched = diff_layouts(a, c, match=True)["splits"]["val"]
    assert matched["pairing"]["same_index"] == 1
    assert matched["folders"]["label"]["agreement"] == 1.0
    by_index = diff_layouts(a, c)["splits"]["val"]["folders"]
    assert by_index["label"]["agreement"] < 1.0 and by_index["image"]["identical"] == 1


def test_real_frames_match_an_independent_conversion(nyuv2_frames, tmp_path):
    """Two real NYUv2 frames (shared data): their raw PNGs packed as the labelled .mat and
    prepared without the crop equal, label for label and depth for depth, the independent
    conversion in ``layout/`` (a plain 480x640 -> 288x384 nearest resize)."""
    from PIL import Image

    from mtpsl.data.prepare.diff import diff_layouts
    from mtpsl.data.prepare.nyuv2 import MAP_894_TO_40, prepare_nyuv2

    raw = nyuv2_frames.parent / "raw"
    to40 = [int(v) for v in "".join(MAP_894_TO_40).strip(",").split(",")]
    first_raw = np.array([0] + [to40.index(c) + 1 for c in range(1, 41)])  # a raw id per class
    images, depths, labels = [], [], []
    for frame in ("000433", "000464"):
        images.append(np.asarray(Image.open(raw / f"{frame}.png").convert("RGB")))
        depths.append(np.asarray(Image.open(raw / f"depth_gt_{frame}.png")) / 5000.0)
        seg = np.asarray(Image.open(raw / f"segm_gt_{frame}.png")).astype(int)  # 0..39, 255
        labels.append(first_raw[np.where(seg == 255, 0, seg + 1)])
    mat = write_nyu_mat(tmp_path / "two.mat", np.stack([*images, images[0]]),
                        np.stack([*depths, depths[0]]), np.stack([*labels, labels[0]]))
    splits = write_splits(tmp_path / "splits.mat", [3], [1, 2])
    out = tmp_path / "out"
    prepare_nyuv2(mat, splits, "from-depth", out, crop=None, progress=False)
    report = diff_layouts(nyuv2_frames, out, splits=["val"])["splits"]["val"]["folders"]
    assert report["label"]["agreement"] == 1.0 and report["label"]["void_differs"] == 0
    assert report["depth"]["mae"] == 0 and report["depth"]["valid_differs"] == 0
    assert report["image"]["psnr_mean"] > 35  # both bilinear-like, not the same filter
