"""Training-order samplers whose order is a function of (seed, epoch) alone.

A ``RandomSampler`` with a ``torch.Generator`` draws each epoch's order from the generator's
running state, so a run resumed from epoch k's checkpoint (new process, new generator) would
replay epoch 0's order. Lightning calls ``set_epoch`` on a loader's sampler before every epoch;
seeding from it makes the resumed epochs see exactly the batches of an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import Sampler


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator for ``epoch`` of a run seeded with ``seed`` (distinct per pair)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))


class EpochShuffleSampler(Sampler[int]):
    """A random permutation of ``range(len(data))`` per epoch, drawn from ``(seed, epoch)``.

    Args:
        data: anything with a length (the dataset).
        seed: the run's data-order seed.
    """

    def __init__(self, data: Sized, seed: int = 0):
        self.data = data
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(len(self.data), generator=epoch_generator(self.seed, self.epoch)).tolist())
