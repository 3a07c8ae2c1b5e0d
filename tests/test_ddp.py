"""Distributed training (2 gloo processes on CPU) equals one process with the same global batch.

Two processes with ``train.batch_size=2`` each take interleaved shards of one seeded
permutation, so at every step their batches together are exactly the 4 images a single
process with ``train.batch_size=4`` sees (augmentations are seeded per image). Losses are
means over images and gradients are averaged over processes, so the updates agree up to
float32 summation order. BatchNorm would otherwise normalise each process's 2 images (4 views
for XTC) with their own statistics, so the distributed runs use ``train.sync_bn=true``.
XTC feeds segmentation predictions through a hard Gumbel-softmax sample, whose noise depends
on how images are split over processes (each process draws its own); the comparison replaces
it by a noise-free softmax in every process.

Tolerance: these tiny random-weight models have gradients up to ~1e5 (depth maps are divided
by their peak), so float32 summation order alone moves gradients by ~1e-5 relative, and any
step large enough to change the next gradient a lot turns that into chaos. The runs therefore
use plain SGD with a small learning rate, and the test asserts that the distributed result is
at least 1000x closer to the single-process one than a run with half the global batch is
(observed: ~5e-5 of it), which a wrong shard, a missing or doubled average or per-process
BatchNorm statistics cannot pass.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from mtpsl.cli import main
from mtpsl.engine.checkpoint import load_checkpoint

from conftest import TINY

RATIO = 1e-3
ARGS = [
    *TINY,  # each run sets its train.batch_size
    "train.max_steps_per_epoch=2",
    "train.eval_batch_size=4",
    "optim.optimizer=sgd",
    "optim.lr=1e-6",
    "optim.momentum=0.0",
    "dataset.tasks=[semantic,depth]",
]
XTC = ["method.name=xtc", "method.options.film_lr=1e-6"]


@pytest.fixture(scope="module")
def root(shared_layout):
    return shared_layout(n=8, h=32, w=48)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _noise_free_gumbel(
    logits, tau: float = 1.0, hard: bool = False, eps: float = 1e-10, dim: int = -1
):
    # the soft sample without noise: continuous, so rounding cannot flip an argmax
    return (logits / tau).softmax(dim)


@pytest.fixture(autouse=True)
def _no_gumbel_noise(monkeypatch):
    monkeypatch.setattr(torch.nn.functional, "gumbel_softmax", _noise_free_gumbel)


def _worker(rank: int, world: int, ports: list[int], jobs: list[list[str]]) -> None:
    """One torchrun-like process: the environment torchrun sets, then `mtpsl` commands."""
    torch.set_num_threads(1)
    torch.nn.functional.gumbel_softmax = _noise_free_gumbel
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1"
    )
    for port, argv in zip(ports, jobs, strict=True):
        os.environ["MASTER_PORT"] = str(port)
        if main(argv) != 0:
            raise SystemExit(f"rank {rank}: mtpsl {' '.join(argv)} failed")


def _params(run_dir) -> dict[str, torch.Tensor]:
    state = load_checkpoint(run_dir / "checkpoint.pt")
    out = {f"model.{k}": v for k, v in state["model"].items() if v.is_floating_point()}
    out.update({f"method.{k}": v for k, v in state["method"].items()})
    return out


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _single(root, run_dir, *extra) -> dict[str, torch.Tensor]:
    argv = ["train", "--run-dir", str(run_dir), f"dataset.root={root}", *ARGS, *extra]
    assert main(argv) == 0
    return _params(run_dir)


@pytest.mark.slow  # five runs; the torchrun test below keeps two-process training in the fast tier
def test_two_spawned_processes_match_one_process_sl_xtc_and_resume(root, tmp_path):
    d = tmp_path
    common = [f"dataset.root={root}", *ARGS, "train.batch_size=2", "train.sync_bn=true"]
    jobs = [
        ["train", "--run-dir", str(d / "xtc2"), *common, *XTC],
        ["train", "--run-dir", str(d / "sl2"), *common],
        ["train", "--resume", str(d / "sl2"), "train.epochs=2"],
    ]
    ports = [_free_port() for _ in jobs]
    mp.start_processes(_worker, args=(2, ports, jobs), nprocs=2, start_method="spawn")

    xtc1 = _single(root, d / "xtc1", "train.batch_size=4", *XTC)
    xtc_half = _single(root, d / "xtc_half", "train.batch_size=2", *XTC)
    assert _max_diff(_params(d / "xtc2"), xtc1) < RATIO * _max_diff(xtc_half, xtc1)
    assert any(k.startswith("method.loss_fn.mapper.") for k in xtc1)  # mapping net compared
    # sl: 1 epoch, then resumed for a 2nd under 2 processes == 2 epochs in one process
    sl1 = _single(root, d / "sl1", "train.batch_size=4", "train.epochs=2")
    sl_half = _single(root, d / "sl_half", "train.batch_size=2", "train.epochs=2")
    assert _max_diff(_params(d / "sl2"), sl1) < RATIO * _max_diff(sl_half, sl1)
    assert load_checkpoint(d / "sl2" / "checkpoint.pt")["epoch"] == 2


def test_torchrun_cli_trains_with_rank0_outputs(root, tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "mtpsl",
        "train",
        "--run-dir",
        str(run),
        f"dataset.root={root}",
        *ARGS,
        "train.batch_size=2",
        "train.sync_bn=true",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count('"reported": "last epoch"') == 1  # printed by rank 0 only
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and '"eval/semantic/miou"' in rows[0]
    single = _single(root, tmp_path / "single", "train.batch_size=4")
    half = _single(root, tmp_path / "half", "train.batch_size=2")
    assert _max_diff(_params(run), single) < RATIO * _max_diff(half, single)
