"""Shared fixtures: tiny random datasets in the standard ``.npy`` layouts, the overrides and the
helper of tiny CLI training runs, and the test tiers.

Tiers: ``make test`` runs ``-m "not slow"`` on every core (pytest-xdist), ``make test-all`` (and
CI) that and then the slow tier (``-m slow --dist loadfile``: a file's tests on one worker, so
its module fixtures, chains of subprocess runs among them, are built once). Plain ``pytest``
runs everything, serially. Under xdist each worker gets its share of the CPU threads.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import subprocess
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


TINY = ["model.width=0.0625", "train.epochs=1", "train.batch_size=2", "train.progress=false",
        "train.amp=off", "train.channels_last=false"]
"""What every tiny CLI training run shares: a 1/16-width model, one epoch of batches of two, no
progress bar, fp32 in NCHW on every machine (``auto`` trains bf16 where the CPU has it natively,
and the tests' tolerances are fp32's). A module adds what its tests need after these (a later
override wins)."""

TINY_TRAIN = [*TINY, "train.eval_batch_size=4", "train.max_steps_per_epoch=1"]
"""TINY cut to one step per epoch: the cheapest run that trains, evaluates and saves."""


def padded_binary_batch(images, size, ignored_prediction: float | None = None):
    """(prob, label) pairs as one batch padded bottom/right to ``size`` with ignore labels
    (-1); ``ignored_prediction`` is then written wherever a label is ignored, padding included
    (what is predicted there must not matter)."""
    h, w = size
    preds = torch.zeros(len(images), 1, h, w)
    targets = torch.full((len(images), 1, h, w), -1.0)
    for i, (p, g) in enumerate(images):
        preds[i, 0, : p.shape[0], : p.shape[1]] = torch.from_numpy(p)
        targets[i, 0, : g.shape[0], : g.shape[1]] = torch.from_numpy(g)
    if ignored_prediction is not None:
        preds[targets == -1] = ignored_prediction
    return preds, targets


STARTUP = ("run folder: ", "speed: ")
"""Prefixes of the lines a run prints on stderr when its set-up is checked and it starts."""


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of a run folder to change (its lock left behind), returned."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(".lock"))
    return dest


def without_startup(err: str) -> str:
    """``err`` less a run's start-up lines (its folder, the speed choice)."""
    return "".join(line for line in err.splitlines(keepends=True)
                   if not line.startswith(STARTUP))


def mtpsl_process(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    """``python -m mtpsl ARGS`` in a process of its own (one thread), optionally with a
    planned fault (``MTPSL_FAULT``, :mod:`mtpsl.core.faults`); never an inherited one."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MTPSL_FAULT", None)
    if fault:
        env["MTPSL_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "mtpsl", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def train_cli(run: Path, root: Path, *overrides: str, config: str | None = None) -> Path:
    """``mtpsl train`` in this process (the user's entry point without a subprocess's start-up)
    into ``run`` on the layout at ``root``; asserts it succeeded and returns ``run``."""
    from mtpsl.cli import main

    preset = ["--config", config] if config else []
    argv = ["train", *preset, "--run-dir", str(run), f"dataset.root={root}", *overrides]
    assert main(argv) == 0, f"mtpsl {' '.join(argv)} failed"
    return run


def final_metrics(run: Path) -> dict:
    """A finished run's ``final_metrics.json``."""
    return json.loads((run / "final_metrics.json").read_text())


@pytest.fixture(scope="session")
def shared_layout(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``make_layout`` built once per session (per xdist worker) for each set of arguments.

    Shared between modules, so read-only: a test that adds, changes or removes files of its
    layout builds its own with ``make_layout`` or ``layout_factory``."""
    base = tmp_path_factory.mktemp("layouts")
    built: dict[tuple, Path] = {}

    def get(family: str = "nyuv2", n: int = 4, h: int = 32, w: int = 48, seed: int = 0,
            splits: Sequence[str] = ("train", "val")) -> Path:
        key = (family, n, h, w, seed, tuple(splits))
        if key not in built:
            built[key] = make_layout(base, family, n, h, w, seed, splits)
        return built[key]

    return get


@pytest.fixture(scope="session")
def tiny_root(shared_layout: Callable[..., Path]) -> Path:
    """The usual tiny NYUv2 layout: 4 train and 4 val images of 32x48, built once; read-only."""
    return shared_layout(n=4, h=32, w=48)


# --- tiers -----------------------------------------------------------------------------------

_XTASK = "tests/test_xtask.py::test_cli_"
SLOW = {
    # A SIGKILL mid-epoch of a subprocess run, then resume (three runs); the fast tier keeps
    # the kill during a checkpoint write, and test_faults' Ctrl-C run.
    "tests/test_resume_kill.py::test_sigkill_mid_epoch_then_resume_is_bitwise_identical",
    # A 2x2 compare grid; test_compare_prints_a_table_with_delta_m and test_report's rows of
    # two weightings and two models stay.
    "tests/test_training.py::test_grids_of_two_weightings_and_two_models_report_separate_"
    "labelled_rows",
    # TaskTransferNet through the CLI, a full-width ResNet-18 per run: one run per family
    # (uniform weighting, the l1 option set, the NYUv2 preset) stays in the fast tier.
    f"{_XTASK}trains_synthetic_xtask_with_each_kind_of_weighting[uncertainty]",
    f"{_XTASK}trains_synthetic_xtask_with_each_kind_of_weighting[gradnorm]",
    f"{_XTASK}trains_synthetic_xtask_with_each_kind_of_weighting[pcgrad]",
    f"{_XTASK}trains_with_each_option_value[mse]",
    f"{_XTASK}trains_with_each_option_value[logl1]",
    f"{_XTASK}trains_with_each_option_value[smoothl1]",
    f"{_XTASK}runs_the_published_presets_at_tiny_size[xtask_cityscapes-cityscapes]",
}
"""Node ids of files kept byte-identical that run in the slow tier, marked here instead of in
their files (the other files mark theirs with ``@pytest.mark.slow``)."""


def pytest_configure(config: pytest.Config) -> None:
    """An xdist worker uses its share of the CPUs: two workers with two intra-op threads each on
    two cores ran the tiny-tensor tests 5x slower than with one thread each (threads spin while
    they wait). Subprocesses inherit the setting; an explicit OMP_NUM_THREADS wins."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None or "OMP_NUM_THREADS" in os.environ:
        return
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cpus or 1) // int(workerinput["workercount"]))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests of ``SLOW``."""
    for item in items:
        if item.nodeid in SLOW:
            item.add_marker(pytest.mark.slow)


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
