"""Sharding of the resumable sampler across data-parallel processes (med3dvlm.data.sampling)."""

from __future__ import annotations

import pytest
import torch

from med3dvlm.data.sampling import ResumableDataLoader, ResumableSampler


def indices(sampler):
    return [item.index for item in sampler]


@pytest.mark.parametrize("size", [10, 11, 13])
def test_training_shards_are_equal_disjoint_and_interleave_the_single_process_order(size):
    world = 3
    single = indices(ResumableSampler(size, seed=5))
    shards = [indices(ResumableSampler(size, seed=5, rank=r, world_size=world)) for r in range(world)]
    used = size - size % world
    assert {len(s) for s in shards} == {used // world}  # every process takes the same number of steps
    assert [len(ResumableSampler(size, seed=5, rank=r, world_size=world)) for r in range(world)] == [
        used // world
    ] * world
    for rank, shard in enumerate(shards):
        assert shard == single[:used][rank::world]
    assert sorted(i for s in shards for i in s) == sorted(single[:used])  # disjoint: no sample twice


def test_training_shards_leave_out_a_different_tail_each_epoch():
    left_out = []
    for epoch in range(4):
        samplers = [ResumableSampler(11, seed=0, rank=r, world_size=2) for r in range(2)]
        for sampler in samplers:
            sampler.set_epoch(epoch)
        used = {i for sampler in samplers for i in indices(sampler)}
        (missing,) = set(range(11)) - used
        left_out.append(missing)
    assert len(set(left_out)) > 1


@pytest.mark.parametrize("size", [9, 10])
def test_evaluation_shards_hold_every_sample_exactly_once(size):
    # no padding with repeated samples (what Lightning's DistributedSampler would do)
    shards = [indices(ResumableSampler(size, shuffle=False, rank=r, world_size=2)) for r in range(2)]
    assert shards[0] + shards[1] != list(range(size)) or size < 2  # interleaved, not split in halves
    assert sorted(shards[0] + shards[1]) == list(range(size))
    assert shards[0] == list(range(0, size, 2)) and shards[1] == list(range(1, size, 2))
    assert [len(ResumableSampler(size, shuffle=False, rank=r, world_size=2)) for r in range(2)] == [
        len(s) for s in shards
    ]


def test_without_a_process_group_the_sampler_is_the_whole_epoch():
    assert not torch.distributed.is_initialized()
    sampler = ResumableSampler(7, seed=1)
    assert sampler.shard == (0, 1)
    assert sorted(indices(sampler)) == list(range(7)) and len(sampler) == 7


def test_rank_and_world_size_are_checked():
    with pytest.raises(ValueError, match="rank and world_size"):
        ResumableSampler(4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="rank and world_size"):
        ResumableSampler(4, rank=0)


def test_distributed_resume_continues_every_shard_where_it_stopped():
    """Two processes train 2 batches of 2 each, then die; the saved count is global, and the
    resumed shards are the rest of the uninterrupted ones."""
    world, batch, size = 2, 2, 20

    class Echo(torch.utils.data.Dataset):  # yields the EpochIndex it is asked for
        def __len__(self):
            return size

        def __getitem__(self, key):
            return key

    dataset = Echo()

    def loader(rank):
        sampler = ResumableSampler(size, seed=9, rank=rank, world_size=world)
        sampler.set_epoch(1)
        return ResumableDataLoader(dataset, sampler=sampler, batch_size=batch, collate_fn=lambda items: items)

    def flat(batches):
        return [item.index for b in batches for item in b]

    full = [flat(loader(r)) for r in range(world)]
    states = []
    for rank in range(world):
        interrupted = loader(rank)
        iterator = iter(interrupted)
        next(iterator), next(iterator)
        states.append(interrupted.state_dict())
    assert states[0] == states[1] == {"epoch": 1, "consumed_samples": 2 * batch * world}
    for rank in range(world):
        resumed = loader(rank)
        resumed.load_state_dict(states[0])  # Lightning restores rank 0's loader state on every rank
        assert flat(resumed) == full[rank][2 * batch :]
