"""Training-set samplers: seeded, epoch-aware, and shardable over distributed ranks.

Single-source data uses torch's :class:`~torch.utils.data.DistributedSampler` (with one replica
it is simply a seeded shuffler). Cross-dataset training (several sources, each labelled for
some tasks) uses :class:`DomainBalancedSampler`, so that every mini-batch holds the same number
of images from every source, as SemiMTL's synchronous mini-batches do.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Protocol

import numpy as np
from torch.utils.data import DistributedSampler, Sampler

from mtpsl.core.errors import ConfigError


class EpochSampler(Protocol):
    """A sized, epoch-aware index stream (DistributedSampler, DomainBalancedSampler)."""

    def __iter__(self) -> Iterator[int]: ...
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...


class DomainBalancedSampler(Sampler[int]):
    """Batches of ``batch_size`` images, ``batch_size / D`` from each of the D domains.

    Each epoch every domain is shuffled (seeded by ``(seed, epoch)``); smaller domains are
    cycled (re-shuffled) so the epoch covers the largest domain once. Whole batches are dealt
    to ranks round-robin, so each rank's stream is itself a sequence of balanced batches and
    the union over ranks of step k's batches is the single-process global batch.
    """

    def __init__(
        self,
        domain_ids: np.ndarray,
        batch_size: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.domain_ids = np.asarray(domain_ids)
        self.domains = np.unique(self.domain_ids)
        n_domains = len(self.domains)
        check_balanced_batch(batch_size, n_domains)
        self.batch_size = batch_size
        self.per_domain = batch_size // n_domains
        self.seed, self.num_replicas, self.rank = seed, num_replicas, rank
        self.epoch = 0
        largest = max(int((self.domain_ids == d).sum()) for d in self.domains)
        total_batches = largest // self.per_domain
        self.batches_per_rank = total_batches // num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_rank * self.batch_size

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        n_batches = self.batches_per_rank * self.num_replicas
        need = n_batches * self.per_domain
        streams = [_cycled_permutation(np.flatnonzero(self.domain_ids == d), need, rng)
                   for d in self.domains]
        for b in range(self.rank, n_batches, self.num_replicas):
            part = slice(b * self.per_domain, (b + 1) * self.per_domain)
            yield from (int(i) for stream in streams for i in stream[part])


def check_balanced_batch(batch_size: int, n_domains: int) -> None:
    """Balanced batches need ``batch_size`` to be a multiple of the number of sources."""
    if batch_size % n_domains:
        raise ConfigError(
            f"train.batch_size: {batch_size} must be a multiple of the number of source "
            f"datasets ({n_domains}) so every batch holds each of them equally"
        )


def _cycled_permutation(indices: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """``length`` items: concatenated fresh permutations of ``indices``."""
    reps = -(-length // len(indices))
    return np.concatenate([rng.permutation(indices) for _ in range(reps)])[:length]


def train_sampler(
    domain_ids: np.ndarray | None,
    n_items: int,
    batch_size: int,
    seed: int,
    num_replicas: int = 1,
    rank: int = 0,
) -> EpochSampler:
    """The sampler for a training set (``domain_ids`` None = a single source)."""
    if domain_ids is None or len(np.unique(domain_ids)) < 2:
        dummy = range(n_items)  # DistributedSampler only needs len()
        return DistributedSampler(
            dummy, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed  # type: ignore[arg-type]
        )
    return DomainBalancedSampler(domain_ids, batch_size, seed, num_replicas, rank)


class ResumableSampler(Sampler[int]):
    """A training sampler whose next pass can start part-way, where a preempted run stopped.

    ``start_at(n)`` makes the next ``iter()`` skip the first ``n`` indices of the epoch's
    order (which depends only on the seed and the epoch), so a run resumed mid-epoch sees
    exactly the batches the uninterrupted run saw; later passes start at 0 again.
    """

    def __init__(self, base: EpochSampler) -> None:
        self.base = base
        self._start = 0

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def start_at(self, n_items: int) -> None:
        self._start = n_items

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self) -> Iterator[int]:
        skip, self._start = self._start, 0
        return itertools.islice(iter(self.base), skip, None)

