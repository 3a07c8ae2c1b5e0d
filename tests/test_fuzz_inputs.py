"""Property-based fuzzing of every input a user hands us: dataset .npy files, image files,
config dicts and overrides, split files. Each must either work or raise the library's own
error (DataError / ConfigError), never another exception type, never hang, never run code."""

from __future__ import annotations

import io
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mtpsl.core.config import Config, apply_override, build_config
from mtpsl.core.errors import ConfigError, DataError
from mtpsl.data.layout import nyuv2
from mtpsl.data.splits import Split
from mtpsl.inference.load import read_image

from conftest import make_layout

FUZZ = settings(max_examples=40, deadline=5000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- dataset .npy files -------------------------------------------------------------------------

H, W = 6, 8
FOLDERS = {"image": (H, W, 3), "label": (H, W), "depth": (H, W, 1), "normal": (H, W, 3)}


@pytest.fixture(scope="module")
def base_layout(tmp_path_factory) -> Path:
    return make_layout(tmp_path_factory.mktemp("fuzz"), n=2, h=H, w=W, splits=("train",))


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def _crafted_header(shape, descr: str = "<f4", fortran: bool = False, version=(1, 0),
                    payload: bytes = b"") -> bytes:
    header = repr({"descr": descr, "fortran_order": fortran, "shape": shape}).encode("latin1")
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    size = struct.pack("<H", len(header)) if version == (1, 0) else struct.pack("<I", len(header))
    return b"\x93NUMPY" + bytes(version) + size + header + payload


DTYPES = st.sampled_from(
    ["float32", ">f8", "float16", "int64", "uint8", "uint64", "int8", "bool", "complex64",
     "U3", "S2", "datetime64[s]", "timedelta64[s]", "V4", "object", [("a", "<f4"), ("b", "O")]]
)
dims = st.integers(min_value=0, max_value=9)


@st.composite
def corrupt_npy(draw, kinds=("random", "truncated", "dtype", "shape", "values", "header")):
    kind = draw(st.sampled_from(kinds))
    folder = draw(st.sampled_from(sorted(FOLDERS)))
    shape = FOLDERS[folder]
    if kind == "random":
        return folder, draw(st.binary(max_size=300))
    if kind == "truncated":
        whole = _npy_bytes(np.random.default_rng(0).random(shape).astype(np.float32))
        return folder, whole[: draw(st.integers(0, len(whole) - 1))]
    if kind == "dtype":
        dtype = np.dtype(draw(DTYPES))
        if dtype.hasobject:
            array = np.empty(shape, dtype=dtype)
        else:
            array = np.zeros(shape, dtype=dtype)
        return folder, _npy_bytes(array)
    if kind == "shape":
        new = tuple(draw(st.lists(dims, max_size=4)))
        return folder, _npy_bytes(np.zeros(new, dtype=np.float32))
    if kind == "values":
        array = np.zeros(shape, dtype=np.float32)
        value = draw(st.sampled_from([np.nan, np.inf, -np.inf, -1.0, 1e30, 0.5, 255.0, 13.0]))
        array.flat[draw(st.integers(0, array.size - 1))] = value
        return folder, _npy_bytes(array)
    # a crafted header: huge, negative or odd shapes and descriptors, any version
    big = st.one_of(st.integers(-3, 3), st.integers(2**31, 2**70), st.integers(-(2**63), -1))
    new = draw(st.one_of(st.just(shape), st.lists(big, max_size=4).map(tuple),
                         st.sampled_from([(H, W, 2**62), (2**40, 2**40, 3), (H, W, 3.5), "x",
                                          (H, -W, 3), None])))
    descr = draw(st.sampled_from(["<f4", "|b1", "<c8", "O", "|V0", "<U0", "zz", "<f4\x00"]))
    version = draw(st.sampled_from([(1, 0), (2, 0), (3, 0), (9, 9)]))
    payload = draw(st.binary(max_size=64))
    return folder, _crafted_header(new, descr, draw(st.booleans()), version, payload)


def _read_all(root: Path) -> None:
    ds = nyuv2(root, "train")
    for i in range(len(ds)):
        ds[i]


@FUZZ
@given(corruption=corrupt_npy(), index=st.integers(0, 1))
def test_corrupt_npy_files_raise_data_error(base_layout, corruption, index):
    folder, data = corruption
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        shutil.copytree(base_layout, root)
        (root / "train" / folder / f"{index}.npy").write_bytes(data)
        try:
            _read_all(root)
        except DataError:
            pass


@FUZZ
@given(corruption=corrupt_npy(kinds=("header",)), index=st.integers(0, 1))
@example(corruption=("label", _crafted_header((2**70,))), index=0)  # found: OverflowError
@example(corruption=("image", _crafted_header((2**70, W, 3))), index=0)
@example(corruption=("image", _crafted_header((2**40, 2**40, 3))), index=0)  # wraps to 0 bytes
@example(corruption=("image", _crafted_header((H, -W, 3))), index=0)
@example(corruption=("depth", _crafted_header((H, W, 1), version=(9, 9))), index=1)
def test_crafted_npy_headers_raise_data_error(base_layout, corruption, index):
    test_corrupt_npy_files_raise_data_error.hypothesis.inner_test(base_layout, corruption, index)


def test_a_huge_declared_shape_is_refused_even_as_the_only_image(tmp_path):
    root = make_layout(tmp_path, n=1, h=H, w=W, splits=("train",))
    for shape in [(2**40, 2**40, 3), (2**70, W, 3), (H, -W, 3), (H, W, -3)]:
        (root / "train" / "image" / "0.npy").write_bytes(_crafted_header(shape))
        with pytest.raises(DataError, match=r"0\.npy"):
            _read_all(root)


def test_a_valid_copy_reads(base_layout):
    _read_all(base_layout)


# -- image files ---------------------------------------------------------------------------------


def _png(width: int, height: int, raw: bytes, color_type: int = 2) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def _valid_image(fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (9, 7, 3), dtype=np.uint8)).save(
        buf, format=fmt
    )
    return buf.getvalue()


@st.composite
def corrupt_image(draw) -> tuple[str, bytes]:
    fmt = draw(st.sampled_from(["PNG", "JPEG", "BMP", "GIF"]))
    suffix = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "GIF": ".gif"}[fmt]
    kind = draw(st.sampled_from(["random", "truncated", "flipped", "header"]))
    if kind == "random":
        return suffix, draw(st.binary(max_size=400))
    whole = _valid_image(fmt)
    if kind == "truncated":
        return suffix, whole[: draw(st.integers(0, len(whole) - 1))]
    if kind == "flipped":
        data = bytearray(whole)
        for _ in range(draw(st.integers(1, 8))):
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] = draw(st.integers(0, 255))
        return suffix, bytes(data)
    size = st.sampled_from([0, 1, 7, 2**16, 2**31 - 1, 2**32 - 1])
    return ".png", _png(draw(size), draw(size), draw(st.binary(max_size=64)),
                        draw(st.sampled_from([0, 2, 3, 4, 6, 7])))


@FUZZ
@given(case=corrupt_image())
def test_corrupt_images_raise_data_error_or_read(case):
    suffix, data = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"img{suffix}"
        path.write_bytes(data)
        try:
            array = read_image(path)
        except DataError:
            return
        assert array.dtype == np.float32 and array.ndim == 3 and array.shape[2] == 3
        assert np.isfinite(array).all() and 0 <= array.min() and array.max() <= 1


def test_valid_images_read(tmp_path):
    for fmt, suffix in [("PNG", ".png"), ("JPEG", ".jpg")]:
        (tmp_path / f"a{suffix}").write_bytes(_valid_image(fmt))
        assert read_image(tmp_path / f"a{suffix}").shape == (9, 7, 3)
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(DataError):
        read_image(tmp_path / "dir.png")


# -- configs -------------------------------------------------------------------------------------

KEYS = st.sampled_from(
    ["name", "seed", "output_dir", "dataset", "labels", "model", "method", "optim", "train",
     "compare", "root", "tasks", "options", "regime", "ratios", "file", "width", "lr", "epochs",
     "device", "augment", "scales", "flip", "val_fraction", "batch_size", "weighting", "typo"]
)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
    st.text(max_size=8), st.binary(max_size=4), st.sampled_from(["cpu", "cuda:x", "ratio", "sl"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.tuples(inner),
                            st.dictionaries(st.one_of(KEYS, st.integers(), st.text(max_size=3)),
                                            inner, max_size=3)),
    max_leaves=12,
)
CONFIGS = st.one_of(
    st.dictionaries(st.one_of(KEYS, st.text(max_size=4), st.integers()), VALUES, max_size=5),
    VALUES,
)


@FUZZ
@given(data=CONFIGS)
def test_random_config_dicts_raise_config_error_or_validate(data):
    try:
        config = build_config(data)
    except ConfigError as err:
        assert str(err).startswith("invalid config")
        return
    assert isinstance(config, Config)


ASSIGNMENTS = st.one_of(
    st.text(max_size=30),
    st.builds(lambda k, v: f"{k}={v}",
              st.lists(KEYS, min_size=1, max_size=3).map(".".join),
              st.one_of(st.text(max_size=20),
                        st.sampled_from(["[", "{a: 1", "!!python/object:os.system 'x'",
                                         "*alias", "&a [*a]", "'", ": :", "- a\n b: c", "%",
                                         "!!binary AAAA", "2001-12-14", "1.0e999", "[" * 200,
                                         "!!set {a}", "? a", "\t", "@x", "`x"]))),
)


@FUZZ
@given(assignments=st.lists(ASSIGNMENTS, max_size=4), base=CONFIGS)
def test_random_overrides_raise_config_error_or_validate(assignments, base):
    data = base if isinstance(base, dict) else {}
    try:
        for assignment in assignments:
            apply_override(data, assignment)
        config = build_config(data)
    except ConfigError:
        return
    assert isinstance(config, Config)


# -- split files ---------------------------------------------------------------------------------

JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**80), 2**80), st.floats(),
              st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=16,
)


@st.composite
def split_json(draw) -> bytes:
    import json

    kind = draw(st.sampled_from(["random", "json", "near"]))
    if kind == "random":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return json.dumps(draw(JSON)).encode()
    labelled = draw(st.one_of(JSON, st.lists(st.lists(st.sampled_from([0, 1, 2, -1, 2**70, 0.5,
                                                                      "1", None]),
                                                      max_size=3), max_size=3)))
    data = {"format": "mtpsl-split/1", "tasks": draw(st.one_of(JSON, st.just(["a", "b"]))),
            "labelled": labelled, "regime": draw(JSON), "seed": draw(JSON),
            "params": draw(JSON)}
    for key in draw(st.lists(st.sampled_from(sorted(data)), max_size=2)):
        data.pop(key, None)
    return json.dumps(data).encode()


def _load_split(path: Path, tasks=None) -> None:
    try:
        split = Split.load(path, tasks)
    except DataError:
        return
    assert split.labelled.dtype == bool and split.labelled.ndim == 2
    assert len(split.task_names) == split.labelled.shape[1]
    split.counts()
    split.summary()


@FUZZ
@given(data=split_json(), tasks=st.sampled_from([None, ("a", "b")]))
def test_corrupt_json_splits_raise_data_error(data, tasks):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "split.json"
        path.write_bytes(data)
        _load_split(path, tasks)


@st.composite
def split_pth(draw) -> bytes:
    kind = draw(st.sampled_from(["random", "truncated", "payload"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    buf = io.BytesIO()
    torch.save({"labels_weights": torch.ones(4, 2)}, buf)
    whole = buf.getvalue()
    if kind == "truncated":
        return whole[: draw(st.integers(0, len(whole) - 1))]
    weights = draw(st.sampled_from([
        torch.ones(3, 2, dtype=torch.bfloat16), torch.ones(3, 2, dtype=torch.complex64),
        torch.ones(3, 2, requires_grad=True), torch.zeros(3, 0), torch.ones(2, 2, 2),
        torch.tensor(1.0), torch.full((2, 2), float("nan")), torch.ones(3, 2).to_sparse(),
        torch.ones(3, 2, dtype=torch.bool), torch.ones(3, 2, dtype=torch.float8_e4m3fn),
        "weights", 3, None, [[1, 0], [0, 1]], [[1, "x"]], {"a": 1}, [[2**70]],
    ]))
    outer = draw(st.sampled_from(["dict", "tensor", "list"]))
    obj = {"labels_weights": weights} if outer == "dict" else (
        torch.ones(2) if outer == "tensor" else [weights])
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@FUZZ
@given(data=split_pth(), tasks=st.sampled_from([None, ("a", "b")]))
def test_corrupt_pth_splits_raise_data_error(data, tasks):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "split.pth"
        path.write_bytes(data)
        _load_split(path, tasks)


class _Exploit:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _ExecExploit(_Exploit):
    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("cls", [_Exploit, _ExecExploit])
@pytest.mark.parametrize("how", ["torch", "pickle", "nested"])
def test_a_pth_that_would_run_code_is_refused(tmp_path, cls, how):
    import pickle

    marker = tmp_path / "marker"
    path = tmp_path / "split.pth"
    evil = cls(marker)
    with open(path, "wb") as f:
        if how == "pickle":
            pickle.dump({"labels_weights": evil}, f)
        elif how == "nested":
            torch.save({"labels_weights": torch.ones(2, 2), "x": [evil]}, f)
        else:
            torch.save({"labels_weights": evil}, f)
    assert not marker.exists()
    with pytest.raises(DataError, match="not a reference split"):
        Split.load(path)
    assert not marker.exists()
