"""Resumable sampling: a run killed mid-epoch continues with exactly the batches it had left.

The order of an epoch is a permutation drawn from ``(seed, epoch)``, and each sample's augmentation
is seeded from ``(seed, epoch, index)``: neither depends on how many loader workers there are or on
when the process started. The loader reports how many batches the training loop consumed, which
Lightning stores in checkpoints (``state_dict``) and hands back on resume (``load_state_dict``).
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


class ResumableSampler(Sampler[EpochIndex]):
    """Shuffled (or sequential) indices per epoch; can start an epoch part-way through."""

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True) -> None:
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0  # samples of this epoch already consumed (set on resume)

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
        for index in self.order(self.epoch)[start:]:
            yield EpochIndex(self.epoch, index)

    def __len__(self) -> int:
        # the whole epoch: Lightning restores its own batch counters and expects the full length
        return self.size


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` that Lightning can checkpoint mid-epoch.

    ``lookahead`` is how many batches the consumer fetches beyond the one it trains on when a
    checkpoint is written. Lightning's training loop fetches none ahead for a loader of known
    length (tests/test_resume.py checks this end to end), hence the default 0.
    """

    def __init__(self, dataset, *, sampler: Sampler, lookahead: int = 0, **kwargs: Any) -> None:
        # keyword-only `sampler`: Lightning re-creates the loader with a DistributedSampler under
        # DDP, and then (see state_dict) mid-epoch resumption falls back to Lightning's own handling.
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
        self._yielded = sampler.start // self.batch_size
        self._exhausted = False
        for batch in super().__iter__():
            self._yielded += 1
            yield batch
        self._exhausted = True

    def state_dict(self) -> dict[str, int]:
        if not isinstance(self.sampler, ResumableSampler):
            return {}
        consumed = self._yielded if self._exhausted else max(0, self._yielded - self.lookahead)
        return {"epoch": self._epoch_started, "consumed_samples": consumed * self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.sampler
        if not state or not isinstance(sampler, ResumableSampler):
            return
        sampler.epoch = state["epoch"]
        sampler.start = min(state["consumed_samples"], sampler.size)
