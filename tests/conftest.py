"""Shared fixtures: tiny random datasets in the standard ``.npy`` layouts."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from mtpsl.models import HeadSpec
from mtpsl.tasks import build_task

FAMILIES = {
    # folder -> (kind, extra): kind "label" with number of classes, or "depth"/"normal"
    "nyuv2": {"label": ("label", 13), "depth": ("depth", 0), "normal": ("normal", 0)},
    "cityscapes": {"label_7": ("label", 7), "label_19": ("label", 19), "depth": ("depth", 0)},
}


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """A script of ``benchmarks/`` as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def representation_of(weighting, z) -> dict:
    """The ``representation=`` keyword of ``GradientContext`` when the strategy works on the
    shared representation (``method.weighting_gradients``), as the trainer fills it."""
    return {"representation": z} if weighting.gradients == "representation" else {}


def make_layout(
    tmp_path: Path,
    family: str = "nyuv2",
    n: int = 4,
    h: int = 24,
    w: int = 32,
    seed: int = 0,
    splits: Sequence[str] = ("train", "val"),
) -> Path:
    """Write a random but valid dataset ``ROOT/{split}/{folder}/{i}.npy``; return ROOT.

    Arrays are float32 like the published layouts: images in [0,1], labels holding ints with
    -1 = ignore, depth (H,W,1) with some 0 = invalid pixels, unit normals with some zero ones.
    """
    rng = np.random.default_rng(seed)
    root = tmp_path / family
    k = 1
    while root.exists():
        root, k = tmp_path / f"{family}-{k}", k + 1
    for split in splits:
        folder = root / split / "image"
        folder.mkdir(parents=True)
        for i in range(n):
            np.save(folder / f"{i}.npy", rng.random((h, w, 3), dtype=np.float32))
        for name, (kind, classes) in FAMILIES[family].items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                np.save(folder / f"{i}.npy", _target(rng, kind, classes, h, w, family))
    return root


def _target(
    rng: np.random.Generator, kind: str, classes: int, h: int, w: int, family: str
) -> np.ndarray:
    if kind == "label":
        return rng.integers(-1, classes, size=(h, w)).astype(np.float32)
    if kind == "depth":
        top = 0.49 if family == "cityscapes" else 10.0
        depth = rng.uniform(0.01, top, size=(h, w, 1)).astype(np.float32)
        depth[rng.random((h, w, 1)) < 0.1] = 0.0
        return depth
    normal = rng.normal(size=(h, w, 3))
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    normal[rng.random((h, w)) < 0.1] = 0.0
    return normal.astype(np.float32)


@pytest.fixture
def layout_factory(tmp_path: Path) -> Callable[..., Path]:
    """``make_layout`` bound to this test's ``tmp_path``."""
    return functools.partial(make_layout, tmp_path)


def shared_dir() -> Path:
    """The shared data folder (``MTPSL_SHARED`` overrides ``/work/shared``-style discovery)."""
    env = os.environ.get("MTPSL_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture
def nyuv2_frames() -> Path:
    """Root of the two real NYUv2 frames in the layout; skips when shared data is absent."""
    root = shared_dir() / "data" / "nyuv2-2frames" / "layout"
    if not (root / "val" / "image").is_dir():
        pytest.skip(f"shared data not available at {root}")
    return root


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny-tensor tests: faster, far faster on a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_TRAIN = [
    "model.width=0.0625",
    "train.epochs=1",
    "train.batch_size=2",
    "train.eval_batch_size=4",
    "train.max_steps_per_epoch=1",
    "train.progress=false",
]
"""Overrides for a one-step CLI training run on tiny data."""


PASCAL_TASKS = ["semantic", "parts", "normal", "saliency", "edges"]
"""The task order of the (synthetic) PASCAL-Context layout."""


def _train_pascal(base: Path, method: str) -> Path:
    from mtpsl.cli import main

    data = base / "data"
    if not data.exists():
        assert main(["data", "synth", "--layout", "pascal_context", "--out", str(data),
                     "--n-train", "4", "--n-val", "2", "--height", "32", "--width", "48"]) == 0
    run = base / method
    assert main(["train", "--config", "synthetic_table3", "--run-dir", str(run),
                 f"dataset.root={data}", f"method.name={method}", *TINY_TRAIN,
                 "train.max_steps_per_epoch=2", "dataset.options.size=[32,48]"]) == 0
    return run


@pytest.fixture(scope="session")
def pascal_base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pascal")


@pytest.fixture(scope="session")
def pascal_run(pascal_base: Path) -> Path:
    """A tiny sl run on the synthetic PASCAL-Context layout (five tasks), shared by tests."""
    return _train_pascal(pascal_base, "sl")


@pytest.fixture(scope="session")
def pascal_xtc(pascal_base: Path) -> Path:
    """A tiny xtc run on the same data (five tasks, 20 ordered pairs)."""
    return _train_pascal(pascal_base, "xtc")


NYU_TASKS = {
    "semantic": build_task("segmentation", "semantic", num_classes=13),
    "depth": build_task("depth", "depth"),
    "normal": build_task("normal", "normal"),
}
"""NYUv2's three tasks, as the dataset builds them."""
NYU_HEADS = {n: HeadSpec.of(t) for n, t in NYU_TASKS.items()}


def assert_same_state(a, b, where: str = "state") -> None:
    """Bitwise equality of nested checkpoint states (tensors with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
