"""Retrieval metrics at truncated embedding widths (``task.eval_dims``).

Query and corpus embeddings are cut to their first ``d`` coordinates and L2-normalised again, then
searched and scored like the full ones; metric names get an ``@d<d>`` suffix (``ndcg@10@d128``).
For a Matryoshka-trained student (``kdkit.distillers.matryoshka``) this is how its prefixes are
meant to be used; for the teacher stage it measures what truncating the teacher costs, the
comparison a truncated student is held to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from kdkit.distillers.matryoshka import truncate
from kdkit.errors import KdkitError
from kdkit.retrieval_metrics import retrieval_metrics


def check_eval_dims(dims) -> list[int]:
    """``dims`` as a list of distinct positive integers (a clear error otherwise)."""
    dims = list(dims or [])
    if any(not isinstance(d, int) or isinstance(d, bool) or d <= 0 for d in dims) or len(set(dims)) != len(dims):
        raise KdkitError(f"task.eval_dims={dims}: give distinct positive integers, e.g. [256, 128, 64]")
    return dims


def truncated_metrics(queries: Tensor, corpus: Tensor, query_ids: Sequence[str], doc_ids: Sequence[str],
                      qrels: Mapping[str, Mapping[str, int]], dims: Sequence[int], metrics: Sequence[str],
                      backend: str = "torch") -> dict[str, float]:
    """``{"<metric>@d<d>": value}`` for every ``d`` of ``dims`` narrower than the embeddings (a
    ``d`` at or above the width would repeat the full-width figures, so it is left out: one task
    config serves stages of different widths, e.g. a 384-d teacher and a 128-d student)."""
    out: dict[str, float] = {}
    for d in dims:
        if d >= queries.shape[1]:
            continue
        scores = retrieval_metrics(truncate(queries, d), truncate(corpus, d), query_ids, doc_ids, qrels,
                                   metrics, backend)
        out.update({f"{name}@d{d}": value for name, value in scores.items()})
    return out
