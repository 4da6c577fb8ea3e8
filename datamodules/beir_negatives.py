"""Negative candidates of the BEIR tuple streams: per train query, the passages its negatives come from.

The datamodule runs no model, so it does not rank passages itself: hard negatives arrive as data,
through ``BEIRDataModule.use_negatives`` (the retrieval task mines them from its teacher's
ranking, ``kdkit.tasks.retrieval_table.mine_negatives``) and are checked here
(``checked_negatives``). Without them (a stage without a teacher, e.g. the InfoNCE baseline),
``random_negatives`` draws non-positive passages with the seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kdkit.errors import KdkitError


def random_negatives(positives: Sequence[set[int]], num_docs: int, k: int, seed: int) -> list[list[int]]:
    """Per train query, ``k`` passages drawn at random with ``seed`` (at most ``k``: positives
    drawn are dropped, not replaced)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for pos in positives:
        draw = torch.randperm(num_docs, generator=g)[: k + len(pos)].tolist()
        out.append([d for d in draw if d not in pos][:k])
    return out


def checked_negatives(negatives: Sequence[Tensor | Sequence[int]], positives: Sequence[set[int]],
                      num_docs: int) -> list[list[int]]:
    """``negatives`` (one row of corpus row numbers per train query: a 1-D tensor or a sequence
    of ints) as lists of ints, after checking that there is one row per train query, that every
    number is a corpus row and that none is one of its query's positives."""
    if len(negatives) != len(positives):
        raise KdkitError(f"{len(negatives)} rows of negatives for {len(positives)} train queries: "
                         "one row per train query is needed")
    rows = [[int(d) for d in (row.tolist() if isinstance(row, Tensor) else row)] for row in negatives]
    for q, (row, pos) in enumerate(zip(rows, positives)):
        bad = [d for d in row if not 0 <= d < num_docs]
        if bad:
            raise KdkitError(f"negatives of train query {q}: {bad[0]} is not a corpus row (0..{num_docs - 1})")
        if pos.intersection(row):
            raise KdkitError(f"negatives of train query {q} include its positive passage {min(pos.intersection(row))}")
    return rows
