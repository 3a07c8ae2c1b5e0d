"""Layout datasets: exact round-trip of the .npy files and one clear DataError per defect."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mtpsl.core.errors import DataError
from mtpsl.data.layout import DATASETS, LayoutDataset, cityscapes, nyuv2, read_npy_header
from mtpsl.tasks import DepthTask, NormalTask, SegmentationTask

from conftest import make_layout

H, W = 24, 32


def _load(path: Path) -> np.ndarray:
    return np.load(path)


def test_registry_names() -> None:
    assert "nyuv2" in DATASETS and "cityscapes" in DATASETS
    assert DATASETS.get("nyuv2") is nyuv2


def test_nyuv2_round_trip(tmp_path: Path) -> None:
    root = make_layout(tmp_path, "nyuv2", n=3, h=H, w=W)
    ds = nyuv2(root, "train")
    assert len(ds) == 3 and (ds.height, ds.width) == (H, W)
    assert ds.task_names == ("semantic", "depth", "normal")
    assert isinstance(ds.tasks["semantic"], SegmentationTask)
    assert ds.tasks["semantic"].num_classes == 13
    assert isinstance(ds.tasks["depth"], DepthTask)
    assert isinstance(ds.tasks["normal"], NormalTask)
    assert ds.available.dtype == bool and ds.available.shape == (3, 3) and ds.available.all()
    for i in range(3):
        item = ds[i]
        split = root / "train"
        assert item["image"].dtype == torch.float32 and item["image"].shape == (3, H, W)
        assert torch.equal(
            item["image"], torch.from_numpy(_load(split / f"image/{i}.npy")).permute(2, 0, 1)
        )
        assert item["semantic"].dtype == torch.int64 and item["semantic"].shape == (H, W)
        label = _load(split / f"label/{i}.npy")
        assert torch.equal(item["semantic"], torch.from_numpy(label).long())
        assert item["semantic"].min() >= -1 and item["semantic"].max() <= 12
        assert item["depth"].dtype == torch.float32 and item["depth"].shape == (1, H, W)
        assert torch.equal(
            item["depth"], torch.from_numpy(_load(split / f"depth/{i}.npy")).permute(2, 0, 1)
        )
        assert item["normal"].shape == (3, H, W)
        assert torch.equal(
            item["normal"], torch.from_numpy(_load(split / f"normal/{i}.npy")).permute(2, 0, 1)
        )
        assert item["index"].dtype == torch.int64 and item["index"].ndim == 0 and item["index"] == i
        assert item["available"].dtype == torch.bool and item["available"].tolist() == [True] * 3


@pytest.mark.parametrize("classes", [7, 19])
def test_cityscapes_round_trip(tmp_path: Path, classes: int) -> None:
    root = make_layout(tmp_path, "cityscapes", n=2)
    ds = cityscapes(root, "val", num_classes=classes)
    assert ds.task_names == ("semantic", "depth")
    assert ds.tasks["semantic"].num_classes == classes
    item = ds[1]
    label = _load(root / f"val/label_{classes}/1.npy")
    assert torch.equal(item["semantic"], torch.from_numpy(label).long())
    assert int(item["semantic"].max()) < classes
    depth = _load(root / "val/depth/1.npy")
    assert torch.equal(item["depth"][0], torch.from_numpy(depth[..., 0]))


def test_cityscapes_bad_num_classes(tmp_path: Path) -> None:
    root = make_layout(tmp_path, "cityscapes", n=1)
    with pytest.raises(ValueError, match="7 or 19"):
        cityscapes(root, "val", num_classes=13)


def test_task_subset_and_unknown_task(tmp_path: Path) -> None:
    root = make_layout(tmp_path, "nyuv2", n=2)
    ds = nyuv2(root, "train", tasks=("normal", "semantic"))
    assert ds.task_names == ("normal", "semantic")
    item = ds[0]
    assert set(item) == {"image", "normal", "semantic", "index", "available"}
    assert item["available"].shape == (2,)
    with pytest.raises(ValueError, match="allowed: semantic, depth, normal"):
        nyuv2(root, "train", tasks=("semantic", "edges"))


def test_depth_stored_without_channel(tmp_path: Path) -> None:
    root = make_layout(tmp_path, "nyuv2", n=1)
    depth = _load(root / "train/depth/0.npy")[..., 0]
    np.save(root / "train/depth/0.npy", depth)
    item = nyuv2(root, "train")[0]
    assert item["depth"].shape == (1, H, W)
    assert torch.equal(item["depth"][0], torch.from_numpy(depth))


def test_missing_task_files_are_unavailable(tmp_path: Path) -> None:
    root = make_layout(tmp_path, "nyuv2", n=4)
    (root / "train/normal/1.npy").unlink()
    (root / "train/label/1.npy").unlink()
    (root / "train/depth/3.npy").unlink()
    ds = nyuv2(root, "train")
    assert ds.available.tolist() == [
        [True, True, True],
        [False, True, False],
        [True, True, True],
        [True, False, True],
    ]
    assert ds.missing_counts == {"semantic": 1, "depth": 1, "normal": 1}
    item = ds[1]
    assert item["available"].tolist() == [False, True, False]
    assert item["semantic"].shape == (H, W) and (item["semantic"] == -1).all()
    assert item["normal"].shape == (3, H, W) and (item["normal"] == 0).all()
    assert not ds.tasks["normal"].valid(item["normal"][None]).any()
    assert not ds.tasks["depth"].valid(ds[3]["depth"][None]).any()
    assert ds.tasks["depth"].valid(item["depth"][None]).any()


def test_cache_gives_identical_items(tmp_path: Path) -> None:
    root = make_layout(tmp_path, "nyuv2", n=2)
    plain, cached = nyuv2(root, "train"), nyuv2(root, "train", cache=True)
    for _ in range(2):
        for i in range(2):
            a, b = plain[i], cached[i]
            assert a.keys() == b.keys()
            for k in a:
                assert torch.equal(a[k], b[k])
    cached[0]["image"].zero_()  # mutating an item must not corrupt the cache
    assert torch.equal(cached[0]["image"], plain[0]["image"])


def test_real_nyuv2_frames(nyuv2_frames: Path) -> None:
    ds = nyuv2(nyuv2_frames, "val")
    assert len(ds) == 2 and (ds.height, ds.width) == (288, 384)
    assert ds.available.tolist() == [[True, True, True], [True, True, False]]
    item = ds[1]
    assert item["available"].tolist() == [True, True, False]
    assert (item["normal"] == 0).all()
    assert item["image"].min() >= 0 and item["image"].max() <= 1
    assert item["semantic"].min() >= -1 and item["semantic"].max() <= 12
    assert (item["depth"] == 0).any() and item["depth"].max() > 1  # metres with holes
    n0 = ds[0]["normal"]
    valid = NormalTask("normal").valid(n0[None])[0]
    assert valid.float().mean() > 0.5
    assert torch.allclose(n0.norm(dim=0)[valid], torch.ones(()), atol=1e-2)


# -- error messages ---------------------------------------------------------------------------


def _raises(root: Path, *parts: str, **kwargs: object) -> str:
    with pytest.raises(DataError) as info:
        nyuv2(root, "train", **kwargs)
    message = str(info.value)
    for part in parts:
        assert part in message, message
    return message


def test_missing_root(tmp_path: Path) -> None:
    _raises(tmp_path / "nope", f"dataset root {tmp_path / 'nope'} does not exist")


def test_missing_split(tmp_path: Path) -> None:
    root = make_layout(tmp_path, "nyuv2", n=1, splits=("val",))
    _raises(root, str(root / "train"), "does not exist", "val")


def test_missing_task_folder(tmp_path: Path) -> None:
    root = make_layout(tmp_path, "nyuv2", n=1)
    shutil.rmtree(root / "train/normal")
    _raises(root, str(root / "train/normal"), "does not exist", "depth, image, label")


def test_empty_image_folder(tmp_path: Path) -> None:
    root = make_layout(tmp_path, "nyuv2", n=1)
    (root / "train/image/0.npy").unlink()
    _raises(root, f"{root / 'train/image'} holds no .npy files")


def test_index_gap(tmp_path: Path) -> None:
    root = make_layout(tmp_path, "nyuv2", n=10)
    for i in (3, 7):
        (root / f"train/image/{i}.npy").unlink()
    _raises(root, f"{root / 'train/image'}: indices must be 0..N-1; missing 3, 7 (N=10)")


@pytest.mark.parametrize("name", ["a.npy", "01.npy"])
def test_bad_file_name(tmp_path: Path, name: str) -> None:
    root = make_layout(tmp_path, "nyuv2", n=2)
    (root / "train/image/1.npy").rename(root / "train/image" / name)
    _raises(root, str(root / "train/image" / name), "decimal index")


def test_task_index_without_image(tmp_path: Path) -> None:
    root = make_layout(tmp_path, "nyuv2", n=2)
    shutil.copy(root / "train/depth/0.npy", root / "train/depth/5.npy")
    _raises(root, str(root / "train/depth/5.npy"), "has no image")


def test_wrong_image_shape(tmp_path: Path) -> None:
    root = make_layout(tmp_path, "nyuv2", n=2)
    np.save(root / "train/image/1.npy", np.zeros((H, W, 4), np.float32))
    _raises(root, str(root / "train/image/1.npy"), f"({H}, {W}, 3)", f"({H}, {W}, 4)")


def test_wrong_first_image_shape(tmp_path: Path) -> None:
    root = make_layout(tmp_path, "nyuv2", n=1)
    np.save(root / "train/image/0.npy", np.zeros((3, H, W), np.float32))
    _raises(root, str(root / "train/image/0.npy"), f"(3, {H}, {W})")


def test_wrong_label_shape(tmp_path: Path) -> None:
    root = make_layout(tmp_path, "nyuv2", n=2)
    np.save(root / "train/label/0.npy", np.zeros((H, W, 1), np.float32))
    _raises(root, str(root / "train/label/0.npy"), f"expected semantic shape ({H}, {W})", "got")


def test_depth_size_mismatch(tmp_path: Path) -> None:
    root = make_layout(tmp_path, "nyuv2", n=2)
    np.save(root / "train/depth/1.npy", np.zeros((H // 2, W // 2, 1), np.float32))
    _raises(
        root,
        str(root / "train/depth/1.npy"),
        f"({H}, {W}, 1) or ({H}, {W})",
        f"({H // 2}, {W // 2}, 1)",
    )


def test_corrupt_npy(tmp_path: Path) -> None:
    root = make_layout(tmp_path, "nyuv2", n=2)
    (root / "train/normal/1.npy").write_bytes(b"this is not numpy at all")
    _raises(root, str(root / "train/normal/1.npy"), "not a readable .npy file")


def test_truncated_npy(tmp_path: Path) -> None:
    root = make_layout(tmp_path, "nyuv2", n=2)
    path = root / "train/depth/0.npy"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _raises(root, str(path), "truncated")
    path.write_bytes(data[:40])  # cut inside the header
    _raises(root, str(path), "not a readable .npy file")


def test_object_dtype(tmp_path: Path) -> None:
    root = make_layout(tmp_path, "nyuv2", n=1)
    arr = np.empty((H, W), dtype=object)
    arr[:] = 1
    np.save(root / "train/label/0.npy", arr, allow_pickle=True)
    _raises(root, str(root / "train/label/0.npy"), "object dtype")


def test_non_numeric_dtype(tmp_path: Path) -> None:
    root = make_layout(tmp_path, "nyuv2", n=1)
    np.save(root / "train/label/0.npy", np.full((H, W), "x"))
    _raises(root, str(root / "train/label/0.npy"), "not numeric")


def _item_raises(root: Path, index: int, *parts: str) -> None:
    ds = nyuv2(root, "train")  # header checks pass: values are checked when decoded
    with pytest.raises(DataError) as info:
        ds[index]
    for part in parts:
        assert part in str(info.value), str(info.value)


def test_nan_in_label(tmp_path: Path) -> None:
    root = make_layout(tmp_path, "nyuv2", n=2)
    label = _load(root / "train/label/1.npy")
    label[2, 3] = np.nan
    np.save(root / "train/label/1.npy", label)
    _item_raises(root, 1, str(root / "train/label/1.npy"), "NaN")


def test_nan_in_image_and_depth(tmp_path: Path) -> None:
    root = make_layout(tmp_path, "nyuv2", n=2)
    for folder in ("image", "depth"):
        arr = _load(root / f"train/{folder}/0.npy")
        arr[0, 0, 0] = np.inf if folder == "image" else np.nan
        np.save(root / f"train/{folder}/0.npy", arr)
    _item_raises(root, 0, str(root / "train/image/0.npy"), "NaN or inf")


def test_label_out_of_range(tmp_path: Path) -> None:
    root = make_layout(tmp_path, "nyuv2", n=1)
    label = _load(root / "train/label/0.npy")
    label[0, 0] = 13
    np.save(root / "train/label/0.npy", label)
    _item_raises(root, 0, str(root / "train/label/0.npy"), "[13]", "semantic", "0..12")


def test_negative_depth(tmp_path: Path) -> None:
    root = make_layout(tmp_path, "nyuv2", n=1)
    depth = _load(root / "train/depth/0.npy")
    depth[1, 1, 0] = -2.0
    np.save(root / "train/depth/0.npy", depth)
    _item_raises(root, 0, str(root / "train/depth/0.npy"), ">= 0")


def test_label_not_integer(tmp_path: Path) -> None:
    root = make_layout(tmp_path, "nyuv2", n=1)
    label = _load(root / "train/label/0.npy")
    label[0, 0] = 2.5
    np.save(root / "train/label/0.npy", label)
    _item_raises(root, 0, str(root / "train/label/0.npy"), "integer-valued")


def test_image_out_of_range(tmp_path: Path) -> None:
    root = make_layout(tmp_path, "nyuv2", n=1)
    np.save(root / "train/image/0.npy", np.full((H, W, 3), 255.0, np.float32))
    _item_raises(root, 0, str(root / "train/image/0.npy"), "[0,1]")


def test_uint8_image_and_int_label(tmp_path: Path) -> None:
    root = make_layout(tmp_path, "nyuv2", n=1)
    img = np.arange(H * W * 3, dtype=np.int64).reshape(H, W, 3) % 256
    np.save(root / "train/image/0.npy", img.astype(np.uint8))
    label = _load(root / "train/label/0.npy").astype(np.int16)
    np.save(root / "train/label/0.npy", label)
    item = nyuv2(root, "train")[0]
    assert torch.allclose(item["image"], torch.from_numpy(img).permute(2, 0, 1).float() / 255)
    assert torch.equal(item["semantic"], torch.from_numpy(label).long())


def test_header_reader(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((2, 3, 4), np.float16))
    assert read_npy_header(path) == ((2, 3, 4), np.dtype(np.float16))


def test_layout_dataset_direct(tmp_path: Path) -> None:
    root = make_layout(tmp_path, "cityscapes", n=2)
    tasks = {"seg": SegmentationTask("seg", num_classes=19)}
    ds = LayoutDataset(root, "train", tasks, {"image": "image", "seg": "label_19"})
    assert ds[0]["seg"].shape == (H, W) and ds.task_names == ("seg",)
    with pytest.raises(IndexError):
        ds[2]
