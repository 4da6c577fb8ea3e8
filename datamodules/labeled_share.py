"""A training order in which every batch holds a fixed number of labelled rows.

On transfer data (``kdkit.datamodules.transfer``) a uniformly shuffled batch holds labelled rows in
the labelled share of the data: with 2,000 labels among 19,000 images, about 13 of a batch of 128.
For a classifier that only thins the task loss; for CLIP it starves the contrastive loss, which
contrasts a batch's captioned pairs with each other (13 pairs make an easy 13-way problem; see
``benchmarks/results/teacher_data.md``). Semi-supervised training fixes the mix instead: FixMatch
(Sohn et al. 2020) draws a labelled and an unlabelled stream and puts ``B`` labelled and ``mu B``
unlabelled samples in every batch. ``data.labeled_per_batch=k`` does that here: every batch of
``B`` rows holds ``k`` rows from the labelled stream and ``B - k`` from the unlabelled one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DistributedSampler

from kdkit.distributed import world
from kdkit.errors import KdkitError
from kdkit.sampling import epoch_generator


def stream(rows: torch.Tensor, batches: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """``[batches, width]`` rows of ``rows``, drawn as back-to-back random permutations of them.

    Each permutation (a lap) is cut to a whole number of batches (``len(rows) // width``), so no
    batch straddles two laps and none holds a row twice; the few rows a lap leaves out are random
    and differ between laps."""
    per_lap = len(rows) // width
    laps = -(-batches // per_lap)
    drawn = [rows[torch.randperm(len(rows), generator=generator)][: per_lap * width] for _ in range(laps)]
    return torch.cat(drawn).view(-1, width)[:batches]


class LabeledShareSampler(DistributedSampler):
    """Training order of a transfer view whose batches hold ``per_batch`` labelled rows each.

    Each epoch draws two streams from ``(seed, epoch)``: the labelled rows and the unlabelled
    rows, each as back-to-back random permutations (``stream``; the labelled stream laps its rows
    more often than the unlabelled one: labelled rows are oversampled by design). Global batch ``g`` is the
    next ``per_batch`` labelled rows followed by the next ``batch_size - per_batch`` unlabelled
    rows; rank ``r`` of ``W`` takes the global batches ``r, r + W, ...``, so every rank's batch
    has the same share. An epoch has as many batches as the uniform order's
    (``len(view) // (batch_size * W)`` per rank), so step counts compare across the two.

    It subclasses ``DistributedSampler`` only so that Lightning keeps it under DDP instead of
    injecting its own; it does its own sharding. The loader must use ``batch_size`` and
    ``drop_last=True``; the order is a function of ``(seed, epoch)`` alone, as with
    ``kdkit.sampling.EpochShuffleSampler``, so a resumed run replays the same batches.

    Args:
        hidden: one flag per row of the view, True where the row has no label.
        batch_size: rows per batch on one rank (``data.batch_size``).
        per_batch: labelled rows in each batch, in ``[1, batch_size - 1]``, at most the number of
            labelled rows (a batch never holds a row twice).
        seed: the run's data-order seed.
        num_replicas, rank: default to the current process group (``world()``).
    """

    def __init__(self, hidden: Sequence[bool], batch_size: int, per_batch: int, seed: int = 0,
                 num_replicas: int | None = None, rank: int | None = None):
        here, size = world()
        super().__init__(range(len(hidden)), num_replicas=size if num_replicas is None else num_replicas,
                         rank=here if rank is None else rank, shuffle=True, seed=seed)
        flags = torch.as_tensor(list(hidden), dtype=torch.bool)
        self.labeled = torch.nonzero(~flags).flatten()
        self.unlabeled = torch.nonzero(flags).flatten()
        self.batch_size, self.per_batch = int(batch_size), int(per_batch)
        if not 1 <= self.per_batch < self.batch_size:
            raise KdkitError(f"data.labeled_per_batch={per_batch} must be in [1, batch_size - 1] "
                             f"= [1, {self.batch_size - 1}]: the rest of a batch is unlabelled rows")
        if self.per_batch > len(self.labeled) or self.batch_size - self.per_batch > len(self.unlabeled):
            raise KdkitError(
                f"data.labeled_per_batch={per_batch} with batch_size={self.batch_size} needs at least "
                f"{self.per_batch} labelled and {self.batch_size - self.per_batch} unlabelled rows; the "
                f"training view has {len(self.labeled)} and {len(self.unlabeled)}")
        self.batches = len(flags) // (self.batch_size * self.num_replicas)
        if self.batches == 0:
            raise KdkitError(f"the training view's {len(flags)} rows make no batch of {self.batch_size} "
                             f"on each of {self.num_replicas} processes")

    def __len__(self) -> int:
        return self.batches * self.batch_size

    def __iter__(self) -> Iterator[int]:
        g = epoch_generator(self.seed, self.epoch)
        total = self.batches * self.num_replicas
        labeled = stream(self.labeled, total, self.per_batch, g)
        unlabeled = stream(self.unlabeled, total, self.batch_size - self.per_batch, g)
        batches = torch.cat([labeled, unlabeled], dim=1)[self.rank::self.num_replicas]
        return iter(batches.flatten().tolist())
