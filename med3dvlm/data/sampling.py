"""Resumable sampling: a run killed mid-epoch continues with exactly the batches it had left.

The order of an epoch is a permutation drawn from ``(seed, epoch)``, and each sample's augmentation
is seeded from ``(seed, epoch, index)``: neither depends on how many loader workers there are or on
when the process started. The loader reports how many batches the training loop consumed, which
Lightning stores in checkpoints (``state_dict``) and hands back on resume (``load_state_dict``).

Under data parallelism (DDP, FSDP, DeepSpeed: ``torch.distributed`` initialised) the sampler shards
the epoch's order itself, process ``r`` of ``n`` taking positions ``r, r + n, ...``, so the trainer
config turns Lightning's own sampler replacement off (``use_distributed_sampler: false``): Lightning's
would pad evaluation splits with repeated samples and drop this order's shuffling and resumption.
Training shards are cut to equal length (the last ``size % n`` positions of an epoch's order are left
out, a different few each epoch; every process must take the same number of steps); evaluation
shards hold every sample exactly once and may differ in length by one.
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler


class EpochIndex(NamedTuple):
    """What the sampler yields: the dataset index and the epoch it is drawn for."""

    epoch: int
    index: int


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for one sample's augmentation, independent of worker and process."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def distributed_shard() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` without ``torch.distributed``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ResumableSampler(Sampler[EpochIndex]):
    """Shuffled (or sequential) indices per epoch; can start an epoch part-way through.

    ``even_shards`` (default: ``shuffle``, i.e. training) cuts the shards of a distributed run to
    equal length; ``rank`` / ``world_size`` default to this process's (see the module docstring).
    """

    def __init__(
        self,
        size: int,
        seed: int = 0,
        shuffle: bool = True,
        even_shards: bool | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.even_shards = shuffle if even_shards is None else even_shards
        self._rank, self._world_size = rank, world_size
        if (rank is None) != (world_size is None) or (world_size is not None and not 0 <= rank < world_size):
            raise ValueError(f"give both rank and world_size with 0 <= rank < world_size, got {rank}, {world_size}")
        self.epoch = 0
        self.start = 0  # samples of this epoch already consumed, all processes together (set on resume)

    @property
    def shard(self) -> tuple[int, int]:
        """``(rank, world_size)``: asked when iterating, since the loader may be built before the
        process group exists."""
        if self._world_size is not None:
            return self._rank, self._world_size
        return distributed_shard()

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at every epoch start."""
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[EpochIndex]:
        start, self.start = self.start, 0
        rank, world_size = self.shard
        order = self.order(self.epoch)[: self._used(world_size)]
        for index in order[start + rank :: world_size]:
            yield EpochIndex(self.epoch, index)

    def _used(self, world_size: int) -> int:
        return self.size - self.size % world_size if self.even_shards else self.size

    def __len__(self) -> int:
        # this process's whole epoch: Lightning restores its own batch counters and expects the full length
        rank, world_size = self.shard
        return len(range(rank, self._used(world_size), world_size))


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` that Lightning can checkpoint mid-epoch.

    ``lookahead`` is how many batches the consumer fetches beyond the one it trains on when a
    checkpoint is written. Lightning's training loop fetches none ahead for a loader of known
    length (tests/test_resume.py checks this end to end), hence the default 0.
    """

    def __init__(self, dataset, *, sampler: Sampler, lookahead: int = 0, **kwargs: Any) -> None:
        # keyword-only `sampler`: should Lightning re-create the loader with its DistributedSampler
        # (use_distributed_sampler: true), mid-epoch resumption falls back to its own handling.
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.lookahead = lookahead
        self._yielded = 0
        self._exhausted = False
        self._epoch_started = getattr(sampler, "epoch", 0)

    def __iter__(self):
        sampler = self.sampler
        if not isinstance(sampler, ResumableSampler):
            yield from super().__iter__()
            return
        self._epoch_started = sampler.epoch
        self._yielded = sampler.start // (self.batch_size * sampler.shard[1])
        self._exhausted = False
        for batch in super().__iter__():
            self._yielded += 1
            yield batch
        self._exhausted = True

    def state_dict(self) -> dict[str, int]:
        if not isinstance(self.sampler, ResumableSampler):
            return {}
        consumed = self._yielded if self._exhausted else max(0, self._yielded - self.lookahead)
        # all processes together: each consumed as many batches (training shards are equal)
        return {"epoch": self._epoch_started, "consumed_samples": consumed * self.batch_size * self.sampler.shard[1]}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.sampler
        if not state or not isinstance(sampler, ResumableSampler):
            return
        sampler.epoch = state["epoch"]
        sampler.start = min(state["consumed_samples"], sampler.size)
