"""Length-grouped batches: every sample once per epoch, homogeneous batches, DDP re-sharding."""

import pytest
import torch
from lightning.fabric.utilities.data import _replace_dunder_methods, _update_dataloader
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler

from kdkit.datamodules.length_grouping import LengthGroupedBatchSampler

# 40 short (10 tokens) and 60 long (128 tokens) texts, interleaved
LENGTHS = [10 if i % 5 < 2 else 128 for i in range(100)]


def sampler(seed=0, window=64, drop_last=False, batch_size=8):
    order = RandomSampler(range(100), generator=torch.Generator().manual_seed(seed))
    return LengthGroupedBatchSampler(order, batch_size, drop_last, LENGTHS, window=window, seed=seed)


def test_every_sample_once_per_epoch():
    batches = list(sampler())
    assert sorted(i for b in batches for i in b) == list(range(100))
    assert [len(b) for b in batches].count(8) == 12 and len(batches) == len(sampler()) == 13
    dropped = list(sampler(drop_last=True))
    assert len(dropped) == len(sampler(drop_last=True)) == 12 and all(len(b) == 8 for b in dropped)
    assert len({i for b in dropped for i in b}) == 96


def test_batches_hold_one_length_except_at_the_boundary():
    # one window, sorted longest first: 7 batches of 56 long texts, one of 4 long + 4 short,
    # then 36 short ones
    batches = list(sampler(window=64))
    assert sorted(len({LENGTHS[i] for i in b}) for b in batches) == [1] * 12 + [2]
    padded = sum(max(LENGTHS[i] for i in b) * len(b) for b in batches)
    assert padded == sum(LENGTHS) + 4 * (128 - 10)  # only the boundary batch pads
    # plain random batches of the same order pad nearly every batch to 128
    plain = list(BatchSampler(RandomSampler(range(100), generator=torch.Generator().manual_seed(0)), 8, False))
    assert sum(max(LENGTHS[i] for i in b) * len(b) for b in plain) == 100 * 128


def test_batch_order_is_random_and_seeded():
    first = list(sampler(seed=3))
    assert first == list(sampler(seed=3))
    lengths = [LENGTHS[b[0]] for b in first]
    assert lengths != sorted(lengths, reverse=True)  # not all long batches first
    again = sampler(seed=3)
    epoch1, epoch2 = list(again), list(again)
    assert epoch1 != epoch2  # each epoch a new order


def test_small_windows_keep_the_grouping_local():
    # window of 1 batch: plain random batches
    order = list(RandomSampler(range(100), generator=torch.Generator().manual_seed(0)))
    got = list(LengthGroupedBatchSampler(order, 8, False, LENGTHS, window=1))
    assert [set(b) for b in got] == [set(order[i:i + 8]) for i in range(0, 100, 8)]
    with pytest.raises(ValueError, match="window"):
        LengthGroupedBatchSampler(order, 8, False, LENGTHS, window=0)


def test_lightning_ddp_swaps_in_its_distributed_sampler():
    dataset = list(range(100))
    with _replace_dunder_methods(BatchSampler):  # what Lightning wraps train_dataloader() in
        loader = DataLoader(dataset, batch_sampler=sampler(drop_last=True))
    shards = []
    for rank in range(2):
        dist = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        new = _update_dataloader(loader, dist)
        assert isinstance(new.batch_sampler, LengthGroupedBatchSampler)
        assert new.batch_sampler.sampler is dist and new.batch_sampler.window == 64
        batches = list(new.batch_sampler)
        assert len(batches) == 6 and all(len(b) == 8 for b in batches)
        # the rank's 48 samples form one window: only its boundary batch may mix lengths
        assert sum(len({LENGTHS[i] for i in b}) > 1 for b in batches) <= 1
        shards.append({i for b in batches for i in b})
    assert not shards[0] & shards[1]  # disjoint shards
