"""The code paths that only a CUDA device takes: fused Adam, bf16 autocast with channels-last,
``torch.compile``, NCCL collectives, pinned loaders, the CUDA RNG state of a checkpoint.

Every test here carries the ``cuda`` marker, and ``benchmarks/gpu_check.sh`` runs
``pytest -m cuda`` first on a lent GPU. Without CUDA they skip, except the gloo twin of the
one-process collective test, which runs the same assertions on the CPU so that the test
itself is known to work before a GPU is lent. Each run is tiny (a 1/16-width SegNet, 32x48
images, two steps); tolerances are those of float32 reordering, not of a GPU being "close".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mtpsl.cli import main
from mtpsl.core import distributed
from mtpsl.engine.checkpoint import load_checkpoint

from conftest import TINY, final_metrics, train_cli

pytestmark = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ARGS = [*TINY, "train.eval_batch_size=4", "train.device=cuda", "train.eval_every=1",
        "train.checkpoint_every=1", "optim.lr=1e-3"]


@pytest.fixture
def root(shared_layout):
    return shared_layout(n=6, h=32, w=48)


@pytest.fixture
def exact_fp32():
    """TF32 off for the comparisons (cuDNN convolutions use it by default)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _train(root: Path, run: Path, *extra: str) -> dict:
    return final_metrics(train_cli(run, root, *ARGS, *extra))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(run / "checkpoint.pt")["model"]
    return {k: v.double() for k, v in state.items() if v.is_floating_point()}


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["train/total"] for r in rows]


def _relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a)
    den = sum(float((b[k] ** 2).sum()) for k in b)
    return (num / den) ** 0.5


SGD = ("optim.optimizer=sgd", "optim.momentum=0", "train.epochs=1", "train.max_steps_per_epoch=1")
"""One plain SGD step for the approximate comparisons: the update is the gradient itself.
(Adam's sign-like first steps would amplify rounding, and so would further steps: these tiny
random models have gradients up to ~1e5.)"""


def _update_error(root: Path, tmp_path: Path, runs: dict[str, tuple[str, ...]]) -> float:
    """The relative distance between two variants' updates from the same initial weights
    (read from a run at lr 1e-12: lr=0 is refused, and 1e-12 is 1e9 below the updates)."""
    _train(root, tmp_path / "init", *SGD, "optim.lr=1e-12")
    start = _weights(tmp_path / "init")
    updates = []
    for name, extra in runs.items():
        _train(root, tmp_path / name, *SGD, *extra)
        updates.append({k: v - start[k] for k, v in _weights(tmp_path / name).items()})
    return _relative(*updates)


@needs_cuda
def test_fused_adam_takes_the_steps_of_plain_adam(root, tmp_path, exact_fp32):
    common = ("train.epochs=1", "train.deterministic=true")
    fused = _train(root, tmp_path / "fused", *common, "train.fused_optimizer=true")
    plain = _train(root, tmp_path / "plain", *common, "train.fused_optimizer=false")
    assert "cuda" in fused["environment"]["device"]
    assert _relative(_weights(tmp_path / "fused"), _weights(tmp_path / "plain")) < 1e-5
    assert fused["metrics"].keys() == plain["metrics"].keys()


@needs_cuda
@pytest.mark.parametrize("method", ["sl", "xtc"])
def test_bf16_channels_last_training_tracks_fp32(root, tmp_path, exact_fp32, method):
    """The first step's loss (the forward pass at the initial weights) agrees to 5% (on the
    CPU: sl 0.25%, xtc 3%, whose hard Gumbel samples flip where logits nearly tie). The
    updates are not compared: in these 4-channel nets the gradients of the convolutions
    before BatchNorm are small remainders of cancelling terms, and bf16 rounding moves them
    by more than their size (update cosine 0.18 on the CPU); ``test_speed`` checks the bf16
    XTC gradients against the fp32 oracle instead."""
    args = (*SGD, "optim.lr=1e-3", f"method.name={method}")
    fast = _train(root, tmp_path / "fast", *args, "train.amp=bf16", "train.channels_last=true")
    _train(root, tmp_path / "fp32", *args)
    assert fast["environment"]["amp"] == "bf16"
    fast_loss, ref_loss = _losses(tmp_path / "fast")[0], _losses(tmp_path / "fp32")[0]
    assert abs(fast_loss - ref_loss) <= 0.05 * abs(ref_loss)


@needs_cuda
def test_compiled_training_matches_eager(root, tmp_path, exact_fp32):
    error = _update_error(root, tmp_path, {"compiled": ("train.compile=true",), "eager": ()})
    assert error < 1e-2  # fused kernels reorder float32 sums; the cancellation above amplifies
    compiled, eager = _losses(tmp_path / "compiled"), _losses(tmp_path / "eager")
    assert abs(compiled[0] - eager[0]) <= 1e-4 * abs(eager[0])


@needs_cuda
def test_resume_on_cuda_is_bitwise(root, tmp_path):
    """The checkpoint carries the CUDA RNG state; deterministic kernels make the rest exact."""
    _train(root, tmp_path / "full", "train.epochs=2", "train.deterministic=true")
    _train(root, tmp_path / "part", "train.epochs=1", "train.deterministic=true")
    assert main(["train", "--resume", str(tmp_path / "part"), "train.epochs=2"]) == 0
    full, part = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert all(torch.equal(full[k], part[k]) for k in full)


@needs_cuda
def test_eval_on_cuda_agrees_with_cpu(root, tmp_path, exact_fp32):
    _train(root, tmp_path / "run", "train.epochs=1")
    scores = {}
    for device in ("cuda", "cpu"):
        out = tmp_path / f"eval-{device}.json"
        assert main(["eval", "--run", str(tmp_path / "run"), "--device", device,
                     "--out", str(out)]) == 0
        scores[device] = json.loads(out.read_text())["metrics"]
    for key, value in scores["cpu"].items():
        # one pixel whose two largest logits swap order moves a class IoU by ~1%
        assert scores["cuda"][key] == pytest.approx(value, rel=2e-2, abs=1e-3), key


class _OneRankEnv(distributed.DistEnv):
    """A one-process group whose collectives still run (``DistEnv`` skips them at world 1)."""

    @property
    def enabled(self) -> bool:
        return True


BACKENDS = [
    pytest.param("gloo", "cpu", id="gloo-cpu"),
    pytest.param("nccl", "cuda", id="nccl-cuda", marks=needs_cuda),
]


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_collectives_of_one_process_leave_everything_as_it_is(tmp_path, backend, device):
    """Gradient buckets, buffer and loss averages and the broadcast through a real process
    group of one: every value comes back unchanged, a parameter without a gradient keeps
    ``None``, and the synchronised BatchNorm equals BatchNorm2d."""
    os.environ.pop("TORCHELASTIC_RUN_ID", None)
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        _check_collectives(torch.device(device), _OneRankEnv())
    finally:
        dist.destroy_process_group()


def _check_collectives(device: torch.device, env: distributed.DistEnv) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)).to(device)
    unused = nn.Parameter(torch.zeros(3, device=device))
    model(torch.rand(2, 3, 8, 8, device=device)).square().mean().backward()
    params = [*model.parameters(), unused]
    grads = [p.grad.clone() for p in model.parameters()]
    distributed.allreduce_gradients(params, env)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert unused.grad is None
    buffers = [b.clone() for b in model.buffers()]
    distributed.average_buffers(model, env)
    distributed.broadcast_module(model, env)
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), buffers, strict=True))
    losses = {"a": torch.tensor(1.5, device=device), "b": torch.tensor(-2.0, device=device)}
    assert {k: float(v) for k, v in distributed.all_reduce_mean(losses, env).items()} == {
        "a": 1.5, "b": -2.0}
    plain = nn.BatchNorm2d(4).to(device).train()
    synced = distributed.convert_sync_bn(nn.Sequential(nn.BatchNorm2d(4)), device).to(device)
    x = torch.randn(2, 4, 5, 5, device=device)
    torch.testing.assert_close(synced.train()(x), plain(x))
