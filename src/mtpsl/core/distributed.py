"""Data-parallel training under ``torchrun``: process group, gradient averaging, sync BN.

Why gradients are all-reduced by hand instead of wrapping the model in
DistributedDataParallel: the trained parameters are not only the model's. A method owns
networks (XTC's mapping net, discriminators), a weighting strategy may own parameters, and
a weighting owns the backward pass (gradient-surgery strategies call ``autograd.grad``
several times and write ``.grad`` themselves), which DDP's backward hooks do not see. So
after the weighting's backward every process holds the gradients of its own share of the
batch for *every* optimised parameter, and :func:`allreduce_gradients` averages them in a
few flat buckets (one collective per bucket). The cost is that communication does not
overlap the backward pass; for SegNet-sized models on one node that is a few milliseconds.

Since every process draws ``batch_size`` images and each loss is a mean over its images, the
average of the per-process gradients is the gradient of the global batch's loss (exactly,
up to float summation order) when BatchNorm statistics are global (``train.sync_bn``).

A collective that fails (a peer process died: gloo's "Connection reset by peer") or outwaits
``train.dist_timeout_s`` (a peer stopped or hung) is one :class:`PeerLostError` naming the
peer, its state and the collective (:func:`peer_failure`), exit status
:data:`EXIT_PEER_LOST`, never a traceback: every process records the host and process id
of every rank when it joins the group, so the survivors can tell which one ended or stopped.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mtpsl.core.errors import MtpslError

BUCKET_BYTES = 32 * 2**20
"""Gradients are flattened into buckets of about this size for the all-reduce."""
EXIT_PEER_LOST = 69
"""A peer process of a torchrun group ended or stopped answering (EX_UNAVAILABLE); the last
checkpoint is intact and ``--resume`` continues from it."""
TIMEOUT_KEY = "train.dist_timeout_s"


class PeerLostError(MtpslError):
    """A collective failed because another process of the group ended or did not answer."""

    exit_code = EXIT_PEER_LOST


@dataclass(frozen=True)
class _Peer:
    host: str
    pid: int


_peers: list[_Peer] = []
"""Every rank's host and process id, recorded when this process joined the group."""
_timeout_s: float | None = None


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits; ``world == 1`` means plain single-process training."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_torchrun() -> DistEnv:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun); defaults to one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return DistEnv(rank, world, local)


def setup(env: DistEnv, device: torch.device, timeout_s: float | None = None) -> torch.device:
    """Join the process group (nccl on CUDA, gloo otherwise); return this process's device.

    On CUDA each process takes GPU ``LOCAL_RANK`` unless the config named an index. Every
    collective of the group, joining it included, fails after ``timeout_s`` seconds without
    an answer (``train.dist_timeout_s``; None: torch's default).
    """
    global _timeout_s
    if not env.enabled:
        return device
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
        _timeout_s = timeout_s
        with peer_errors(env):
            dist.init_process_group(backend, rank=env.rank, world_size=env.world,
                                    timeout=timeout)
            found: list[_Peer | None] = [None] * env.world
            dist.all_gather_object(found, _Peer(socket.gethostname(), os.getpid()))
        _peers[:] = [p for p in found if p is not None]
    return device


def teardown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()
        _peers.clear()


# ----------------------------------------------------------------------------- lost peers


_C10D = str(Path(dist.__file__).parent / "distributed_c10d.py")


def _collective(error: BaseException) -> str | None:
    """The torch.distributed function (``all_reduce``, ``barrier``...) in whose call
    ``error`` was raised, None when it did not come from a collective."""
    names = [frame.name for frame in traceback.extract_tb(error.__traceback__)
             if frame.filename == _C10D and not frame.name.startswith("_")]
    # (raised in a backward pass, e.g. sync BN's, a collective's frames may be missing;
    # gloo names its source files in its messages)
    if names or isinstance(error, dist.DistError) or "gloo/" in str(error):
        return names[0] if names else "a collective"
    return None


def _state(peer: _Peer) -> str | None:
    """'ended' or 'stopped' for a process of this host that cannot answer; None when it
    runs (or lives on another host)."""
    if peer.host != socket.gethostname():
        return None
    try:
        stat = Path(f"/proc/{peer.pid}/stat").read_text()
    except FileNotFoundError:
        return "ended"
    except OSError:  # no /proc (macOS): only whether the process exists
        try:
            os.kill(peer.pid, 0)
        except ProcessLookupError:
            return "ended"
        return None
    state = stat.rsplit(")", 1)[-1].split()[0]
    return {"Z": "ended", "X": "ended", "T": "stopped", "t": "stopped"}.get(state)


def _lost_ranks(env: DistEnv, settle_s: float = 2.0) -> dict[int, str]:
    """The other ranks of this host that ended or are stopped (a killed process may take a
    moment to be marked so: looked for during ``settle_s``)."""
    deadline = time.monotonic() + settle_s
    while _peers:
        lost = {rank: state for rank, peer in enumerate(_peers)
                if rank != env.rank and (state := _state(peer)) is not None}
        if lost or time.monotonic() >= deadline:
            return lost
        time.sleep(0.1)
    return {}


_CAUSES = (("timed out", "timeout"), ("timeout", "timeout"),
           ("reset by peer", "connection reset"), ("closed by peer", "connection closed"),
           ("broken pipe", "connection broken"), ("connection refused", "connection refused"))
"""What gloo, nccl and the store say when a peer is gone or silent, and its short name."""


_STATES = {"ended": "ended", "stopped": "is stopped"}


def _cause(error: BaseException) -> str | None:
    text = str(error).lower()
    return next((cause for needle, cause in _CAUSES if needle in text), None)


def peer_failure(error: BaseException, env: DistEnv, after: str = "") -> PeerLostError | None:
    """``error`` as one line naming the lost peer when it is a failed collective of the
    group (None otherwise): ``lost rank 1 of 2 during all-reduce (connection reset; its
    process ended)``, with what the timeout was and which key sets it when it fired, and
    ``after`` appended (where the last checkpoint is)."""
    if not env.enabled:
        return None
    call = _collective(error)
    if call is None:
        return None
    cause = _cause(error)
    lost = _lost_ranks(env)
    if cause is None and not lost:
        return None  # a collective misused (a bug): its traceback is the useful report
    others = [r for r in range(env.world) if r != env.rank]
    if lost:
        who = ", ".join(f"rank {r}" for r in lost)
        state = ("its process " + _STATES[next(iter(lost.values()))] if len(lost) == 1
                 else ", ".join(f"rank {r}'s process {_STATES[s]}" for r, s in lost.items()))
    else:
        who = f"rank {others[0]}" if len(others) == 1 else "a peer"
        state = ""
    what = call.replace("_", "-")
    if cause == "timeout":
        limit = f"{_timeout_s:g} s" if _timeout_s is not None else "torch's default"
        hint = state or (f"{'it is' if len(others) == 1 else 'they are'} still running: if "
                         f"it was only busy (rank 0 evaluates and writes the checkpoint while "
                         f"the others wait), raise {TIMEOUT_KEY}")
        message = (f"lost {who} of {env.world}: no answer within {TIMEOUT_KEY}={limit} "
                   f"during {what} ({hint})")
    else:
        detail = "; ".join(filter(None, [cause or str(error).splitlines()[0][:120], state]))
        message = f"lost {who} of {env.world} during {what} ({detail})"
    return PeerLostError(message + (f"; {after}" if after else ""))


@contextmanager
def peer_errors(env: DistEnv, after: str = "") -> Iterator[None]:
    """Turn a failed collective inside the block into :class:`PeerLostError`.

    torchrun sends SIGTERM to the survivors the moment one process ends; once the loss is
    known, that signal is ignored, so the survivors still exit with the report and
    :data:`EXIT_PEER_LOST` instead of being cut short by it (signal -15)."""
    try:
        yield
    except PeerLostError:
        ignore_termination()
        raise
    except Exception as error:
        lost = peer_failure(error, env, after)
        if lost is None:
            raise
        ignore_termination()
        raise lost from None


def ignore_termination() -> None:
    """SIGTERM ignored from now on (main thread only): this process is ending with a report."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def broadcast_module(module: nn.Module, env: DistEnv) -> None:
    """Copy rank 0's parameters and buffers to every process (identical starting point)."""
    if not env.enabled:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


def _buckets(tensors: Sequence[Tensor]) -> Iterable[list[Tensor]]:
    bucket: list[Tensor] = []
    size = 0
    for t in tensors:
        if bucket and (
            size + t.numel() * t.element_size() > BUCKET_BYTES or t.dtype != bucket[0].dtype
        ):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel() * t.element_size()
    if bucket:
        yield bucket


def allreduce_gradients(params: Sequence[nn.Parameter], env: DistEnv) -> None:
    """Average ``.grad`` over processes, for every parameter, in flat buckets.

    A parameter without a gradient on some process (a head whose task is absent from its
    share of the batch) contributes zeros there; one that has no gradient anywhere keeps
    ``grad = None`` so optimisers skip it exactly as in single-process training.
    """
    if not env.enabled or not params:
        return
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(has)
    grads = []
    # The one host sync of a distributed step: which parameters have a gradient anywhere.
    for p, n in zip(params, has.tolist(), strict=True):
        if n == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    for bucket in _buckets(grads):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        flat /= env.world
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def average_buffers(module: nn.Module, env: DistEnv) -> None:
    """Average floating buffers (BatchNorm running statistics) over processes.

    Without sync BN each process's running statistics come from its share of the data; the
    average is the estimate the evaluation and the checkpoint use.
    """
    if not env.enabled:
        return
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf /= env.world


def all_reduce_mean(values: dict[str, Tensor], env: DistEnv) -> dict[str, Tensor]:
    """Mean over processes of scalar tensors (epoch loss means), in one collective."""
    if not env.enabled or not values:
        return values
    stacked = torch.stack([v.detach().float() for v in values.values()])
    dist.all_reduce(stacked)
    stacked /= env.world
    return dict(zip(values, stacked.unbind(), strict=True))


def group_size() -> int:
    """Processes in the default group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def mean_over_ranks(t: Tensor) -> Tensor:
    """The mean of (detached) ``t`` over the processes; ``t`` itself in a one-process run.

    What the nonlinear loss weightings compute their weights from (per-task gradients, loss
    values), so that every process finds the same weights and the averaged gradient is the
    strategy applied to the global batch, whatever the number of processes.
    """
    if group_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out / group_size()


def any_over_ranks(flags: Tensor) -> Tensor:
    """Element-wise OR of a bool tensor over the processes (which tasks any process has)."""
    if group_size() == 1:
        return flags
    out = flags.to(torch.int32)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.bool()


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward is the all-reduce (sum) of the incoming gradient."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class AllReduceBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the batches of all processes.

    Works with gloo (CPU), where torch's SyncBatchNorm refuses to run. The global sums go
    through an autograd-aware all-reduce, so the backward pass also sums the gradient of the
    statistics over processes, exactly like SyncBatchNorm. State-dict keys are BatchNorm2d's.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        x32 = x.float()
        count = torch.tensor([x.numel() / x.shape[1]], device=x.device)
        stats = torch.cat([x32.sum((0, 2, 3)), (x32 * x32).sum((0, 2, 3)), count])
        stats = _SumOverRanks.apply(stats)
        c = x.shape[1]
        n = stats[-1]
        mean, sq = stats[:c] / n, stats[c : 2 * c] / n
        var = sq - mean * mean
        self._update_running(mean.detach(), var.detach(), n.detach())
        y = (x32 - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, n: Tensor) -> None:
        if not self.track_running_stats:
            return
        assert self.num_batches_tracked is not None  # tracked stats have all three buffers
        assert self.running_mean is not None and self.running_var is not None
        self.num_batches_tracked += 1
        m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * n / (n - 1).clamp(min=1)
        self.running_mean.lerp_(mean, m)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)


def convert_sync_bn(model: nn.Module, device: torch.device) -> nn.Module:
    """Swap every BatchNorm2d for a process-synchronised one (same parameters and keys)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _swap_bn(model)


def _swap_bn(module: nn.Module) -> nn.Module:
    if type(module) is nn.BatchNorm2d:
        new = AllReduceBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        new.load_state_dict(module.state_dict())
        new.to(next(iter(module.state_dict().values())).device)
        return new
    for name, child in module.named_children():
        setattr(module, name, _swap_bn(child))
    return module
