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
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

BUCKET_BYTES = 32 * 2**20
"""Gradients are flattened into buckets of about this size for the all-reduce."""


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


def setup(env: DistEnv, device: torch.device) -> torch.device:
    """Join the process group (nccl on CUDA, gloo otherwise); return this process's device.

    On CUDA each process takes GPU ``LOCAL_RANK`` unless the config named an index.
    """
    if not env.enabled:
        return device
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=env.rank, world_size=env.world)
    return device


def teardown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


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
