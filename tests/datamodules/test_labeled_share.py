"""A fixed labelled share per transfer batch (``data.labeled_per_batch``)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from kdkit.datamodules.digits import DigitsDataModule
from kdkit.datamodules.labeled_share import LabeledShareSampler, stream
from kdkit.errors import KdkitError
from kdkit.labels import UNLABELED

# rows 0..7 labelled, 8..39 not: a 20% share, as transfer data is
HIDDEN = [False] * 8 + [True] * 32


def batches_of(sampler: LabeledShareSampler) -> list[list[int]]:
    order = list(sampler)
    b = sampler.batch_size
    assert len(order) == len(sampler) and len(order) % b == 0
    return [order[i : i + b] for i in range(0, len(order), b)]


def test_every_batch_holds_exactly_the_share_and_no_row_twice():
    sampler = LabeledShareSampler(HIDDEN, batch_size=8, per_batch=2, seed=0)
    batches = batches_of(sampler)
    assert len(batches) == 40 // 8  # as many batches as the uniform order
    for batch in batches:
        assert sum(not HIDDEN[i] for i in batch) == 2 and len(set(batch)) == 8
        assert all(not HIDDEN[i] for i in batch[:2]) and all(HIDDEN[i] for i in batch[2:])


def test_streams_lap_their_rows_evenly():
    # 8 labelled rows, 2 per batch: a lap is 4 batches; 8 batches see every labelled row twice
    sampler = LabeledShareSampler(HIDDEN + [True] * 24, batch_size=8, per_batch=2, seed=3)
    labeled = Counter(i for batch in batches_of(sampler) for i in batch[:2])
    assert len(batches_of(sampler)) == 8 and set(labeled.values()) == {2} and len(labeled) == 8
    # a lap that does not divide into batches leaves rows out instead of repeating one in a batch
    rows = torch.arange(5)
    drawn = stream(rows, batches=6, width=2, generator=torch.Generator().manual_seed(0))
    assert drawn.shape == (6, 2)
    assert all(len(set(b.tolist())) == 2 for b in drawn)
    for lap in (drawn[0:2], drawn[2:4], drawn[4:6]):  # 2 batches of 2 per lap of 5 rows
        assert len(set(lap.flatten().tolist())) == 4


def test_order_is_a_function_of_seed_and_epoch():
    a = LabeledShareSampler(HIDDEN, batch_size=8, per_batch=2, seed=0)
    b = LabeledShareSampler(HIDDEN, batch_size=8, per_batch=2, seed=0)
    first = list(a)
    assert first == list(b) and first == list(a)  # no hidden generator state
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != first
    assert list(LabeledShareSampler(HIDDEN, batch_size=8, per_batch=2, seed=1)) != first


def test_ranks_split_one_global_order():
    hidden = HIDDEN + [True] * 40  # 80 rows: 10 global batches of 8, 5 per rank
    one = batches_of(LabeledShareSampler(hidden, batch_size=8, per_batch=2, seed=4, num_replicas=1, rank=0))
    ranks = [batches_of(LabeledShareSampler(hidden, batch_size=8, per_batch=2, seed=4, num_replicas=2, rank=r))
             for r in range(2)]
    assert [len(r) for r in ranks] == [5, 5]
    assert ranks[0] == one[0::2] and ranks[1] == one[1::2]  # global batch g on rank g mod 2
    for batch in ranks[0] + ranks[1]:
        assert sum(not hidden[i] for i in batch) == 2


@pytest.mark.parametrize("per_batch, hidden, message", [
    (0, HIDDEN, r"in \[1, batch_size - 1\]"),
    (8, HIDDEN, r"in \[1, batch_size - 1\]"),
    (3, [False] * 2 + [True] * 30, "needs at least 3 labelled"),
    (2, [False] * 30 + [True] * 3, "and 6 unlabelled rows"),
])
def test_impossible_shares_are_refused(per_batch, hidden, message):
    with pytest.raises(KdkitError, match=message):
        LabeledShareSampler(hidden, batch_size=8, per_batch=per_batch)


def test_datamodule_serves_the_share_on_the_transfer_view_only():
    dm = DigitsDataModule(labeled_count=100, labeled_per_batch=5, batch_size=16)
    dm.setup("fit")
    dm.use_train_view("transfer")
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, LabeledShareSampler)
    n_batches = 0
    for batch in loader:
        assert int((batch["label"] != UNLABELED).sum()) == 5
        n_batches += 1
    assert n_batches == dm.num_train_samples // 16
    for view in ("all", "labeled"):  # the teacher's and the baseline's stages: uniform batches
        dm.use_train_view(view)
        assert not isinstance(dm.train_dataloader().sampler, LabeledShareSampler)


def test_share_without_transfer_data_is_refused():
    with pytest.raises(KdkitError, match="set data.labeled_fraction, labeled_count or unlabeled"):
        DigitsDataModule(labeled_per_batch=4)
