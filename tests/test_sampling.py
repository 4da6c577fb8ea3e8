"""Training order from (seed, epoch) alone: a resumed run sees the batches a straight run sees."""

import torch

from kdkit.sampling import EpochShuffleSampler


def test_each_epoch_is_a_permutation_fixed_by_seed_and_epoch():
    a, b = EpochShuffleSampler(range(50), seed=3), EpochShuffleSampler(range(50), seed=3)
    orders = []
    for epoch in range(3):
        a.set_epoch(epoch)
        orders.append(list(a))
        assert sorted(orders[-1]) == list(range(50))
    assert orders[0] != orders[1] != orders[2]
    b.set_epoch(2)  # a fresh process that starts at epoch 2 (a resumed run)
    assert list(b) == orders[2]
    assert list(a) == orders[2]  # iterating again does not advance anything
    other = EpochShuffleSampler(range(50), seed=4)
    other.set_epoch(2)
    assert list(other) != orders[2]


def test_lightning_sets_the_epoch_of_the_training_sampler():
    from kdkit.datamodules.digits import DigitsDataModule

    dm = DigitsDataModule(batch_size=64, seed=0)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, EpochShuffleSampler)
    loader.sampler.set_epoch(1)
    first = torch.cat([b["index"] for b in loader])
    loader.sampler.set_epoch(1)
    assert torch.equal(first, torch.cat([b["index"] for b in loader]))
