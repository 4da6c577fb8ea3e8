"""Batches of similar-length texts: less padding per training step.

A random batch of a text stream that mixes 15-token queries with 128-token passages is padded to
128 tokens almost every step, so short texts cost as much as long ones. Grouping texts of similar
length into the same batch (HF ``group_by_length``, fairseq's length buckets) lets the short ones
cost what they are.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import BatchSampler, Sampler

from kdkit.sampling import epoch_generator


class LengthGroupedBatchSampler(BatchSampler):
    """Batches of texts of similar token length, in random order.

    The indices ``sampler`` yields (a shuffled order) are cut into windows of
    ``batch_size * window`` indices; each window is sorted by length and cut into batches, and the
    window's batches are served in random order. Every epoch is still a random pass over the data
    (each sample once), only regrouped within windows, so no length class is served all at once.

    Lightning's DDP swaps its DistributedSampler in as ``sampler`` (it re-instantiates this class
    with the same other arguments), so every rank groups its own shard. Batches keep
    ``batch_size`` samples on every rank; their padded lengths differ, which cross-rank gathers
    of embeddings do not mind.

    Args:
        sampler: the sample order to group (e.g. ``RandomSampler``).
        batch_size, drop_last: as in ``BatchSampler``.
        lengths: token length of sample ``i`` (after truncation), for every dataset index.
        window: batches per sorting window.
        seed: seeds the order of batches within each window.
    """

    def __init__(self, sampler: Sampler[int] | Sequence[int], batch_size: int, drop_last: bool,
                 lengths: Sequence[int], window: int = 64, seed: int = 0):
        super().__init__(sampler, batch_size, drop_last)
        if window < 1:
            raise ValueError(f"window={window}: use 1 or more batches")
        self.lengths = torch.as_tensor(lengths)
        self.window = int(window)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Seed this epoch's batch order from ``(seed, epoch)`` (Lightning calls it every epoch),
        and pass the epoch on to the sample order, so a resumed run replays the same batches."""
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.as_tensor(list(self.sampler), dtype=torch.long)
        if self.drop_last:  # the sampler's last samples, as BatchSampler drops them: no length bias
            order = order[: len(order) // self.batch_size * self.batch_size]
        span = self.batch_size * self.window
        generator = epoch_generator(self.seed, self.epoch)
        for start in range(0, len(order), span):
            chunk = order[start:start + span]
            # stable sort: equal lengths keep the sampler's random order
            chunk = chunk[torch.sort(self.lengths[chunk], descending=True, stable=True).indices].tolist()
            batches = [chunk[j:j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
            for k in torch.randperm(len(batches), generator=generator).tolist():
                yield batches[k]
