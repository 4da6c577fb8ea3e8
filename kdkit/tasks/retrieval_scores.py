"""A scorer teacher's table: its score of every (train query, passage) pair a tuple can hold.

A scorer (``kdkit.models.scorers``: cross-encoder, MaxSim) reads a query and a passage together,
so it cannot be tabulated per text like a bi-encoder. The tuple stream only ever pairs a train
query with its positives and its mined negative candidates, so those pairs are scored once,
before training (cached on disk under the scorer's fingerprint and the pairs' digest), and
batches read ``scores[i, j]`` by their ``query_pool`` / ``passage_pool`` indices:

- ``candidate_pairs(positives, negatives)``: the pairs, ``[N, 2]`` (train query number, corpus row).
- ``build_score_table(scorer, pool, pairs)``: the scorer's ``ScoreTable`` (cached).
- ``embedding_score_table(query_emb, doc_emb, pairs)``: the same table from a bi-encoder's
  embeddings (dot products), for denoising without a scorer.
- ``score_source(name, table)``: the ``PrecomputedTeacher`` giving ``features["scores"]`` ``[B, G]``.
- ``denoise(negatives, positives, table, threshold)``: RocketQA's denoised hard negatives.
- ``ScorerOnTexts``: the scorer run live on the batch's texts (probing only, before any table).
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from kdkit.checkpoint_io import save_atomically
from kdkit.data_contract import StaticPool
from kdkit.errors import KdkitError, unreadable
from kdkit.outputs import Outputs
from kdkit.teacher_source import PrecomputedTeacher, TeacherSource


def candidate_pairs(positives: Sequence[set[int]], negatives: Sequence[Sequence[int]]) -> Tensor:
    """``[N, 2]`` long: every (train query number, corpus row) of a query's positives and its
    negative candidates, sorted, each pair once."""
    if len(positives) != len(negatives):
        raise KdkitError(f"{len(negatives)} rows of negatives for {len(positives)} train queries")
    pairs = sorted({(q, int(d)) for q, (pos, neg) in enumerate(zip(positives, negatives))
                    for d in [*pos, *neg]})
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


class ScoreTable:
    """Scores of (train query number, corpus row) pairs, looked up on any device.

    Pairs are kept as sorted keys ``q * num_docs + d`` (a binary search per lookup: memory
    grows with the pairs, not with queries x corpus).

    Args:
        pairs: ``[N, 2]`` (query number, corpus row).
        scores: ``[N]`` the score of each pair.
        num_docs: corpus rows (key stride).
        query_offset: pool row of train query 0 (batches carry pool rows: corpus, then queries).
    """

    def __init__(self, pairs: Tensor, scores: Tensor, num_docs: int, query_offset: int):
        pairs = torch.as_tensor(pairs, dtype=torch.long).reshape(-1, 2)
        if len(scores) != len(pairs):
            raise KdkitError(f"score table: {len(scores)} scores for {len(pairs)} pairs")
        keys = pairs[:, 0] * num_docs + pairs[:, 1]
        order = keys.argsort()
        self.keys, self.scores = keys[order], scores.float()[order]
        self.num_docs, self.query_offset = int(num_docs), int(query_offset)

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def to(self, device) -> ScoreTable:
        self.keys, self.scores = self.keys.to(device), self.scores.to(device)
        return self

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, queries: Tensor, docs: Tensor) -> Tensor:
        """Scores of (train query number, corpus row) pairs (same shape); a missing pair is an error."""
        keys = queries.to(self.device).long() * self.num_docs + docs.to(self.device).long()
        at = torch.searchsorted(self.keys, keys.reshape(-1)).clamp(max=max(len(self.keys) - 1, 0))
        found = self.keys[at] == keys.reshape(-1) if len(self.keys) else torch.zeros_like(at, dtype=torch.bool)
        if not bool(found.all()):
            k = int(keys.reshape(-1)[~found][0])
            raise KdkitError(f"the scorer's table has no score for train query {k // self.num_docs} with "
                             f"passage {k % self.num_docs}: only its positives and mined negative "
                             "candidates were scored before training")
        return self.scores[at].reshape(keys.shape)

    def group(self, query_pool: Tensor, passage_pool: Tensor) -> Tensor:
        """``[B, G]`` scores of each batch query (pool row ``[B]``) with its group (pool rows ``[B * G]``)."""
        b = len(query_pool)
        queries = (query_pool.long() - self.query_offset).unsqueeze(1).expand(b, len(passage_pool) // b)
        return self.lookup(queries, passage_pool.reshape(b, -1))


def build_score_table(scorer, pool: StaticPool, pairs: Tensor, batch_size: int | None = None) -> ScoreTable:
    """``scorer``'s scores of ``pairs`` (train query number, corpus row) on ``pool``'s texts,
    read from ``pool.cache_dir`` or scored (with a progress bar) and cached there as
    ``scores-<scorer fingerprint[:16]>-<pairs digest[:12]>.pt``."""
    queries, docs = pool.texts[pool.query_kind], pool.texts[pool.corpus_kind]
    digest = hashlib.sha1(pairs.contiguous().numpy().tobytes()).hexdigest()[:12]
    path = Path(pool.cache_dir) / f"scores-{scorer.fingerprint()[:16]}-{digest}.pt"
    scores = _load(path)
    if scores is None or len(scores) != len(pairs):
        scores = scorer.score_pairs(queries, docs, pairs, batch_size=batch_size or pool.batch_size,
                                    progress=True, desc="teacher scores")
        save_atomically(scores.float().cpu().contiguous(), path)
    return ScoreTable(pairs, scores, len(docs), pool_offset(pool))


def embedding_score_table(query_emb: Tensor, doc_emb: Tensor, pairs: Tensor, pool: StaticPool) -> ScoreTable:
    """A bi-encoder's scores of ``pairs``: ``<e(q), e(d)>`` of its embeddings."""
    scores = (query_emb[pairs[:, 0]].float() * doc_emb[pairs[:, 1]].float()).sum(-1)
    return ScoreTable(pairs, scores, len(doc_emb), pool_offset(pool))


def pool_offset(pool: StaticPool, kind: str | None = None) -> int:
    """Pool row of the first text of set ``kind`` (None: the train queries)."""
    kind = kind or pool.query_kind
    offset = 0
    for name, texts in pool.texts.items():
        if name == kind:
            return offset
        offset += len(texts)
    raise KdkitError(f"the static pool has no {kind!r} texts")


def _load(path: Path) -> Tensor | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as err:
        raise unreadable(path, "cached teacher scores", err, "delete it: kdkit scores the pairs again") from None


# ---- reading the table ----------------------------------------------------------------------------
def score_rows(table: ScoreTable, batch: dict) -> Outputs | None:
    """``features["scores"]`` ``[B, G]`` of a tuple batch (None: the batch has no tuples)."""
    if "query_pool" not in batch or "passage_pool" not in batch:
        return None
    return Outputs(features={"scores": table.group(batch["query_pool"], batch["passage_pool"])})


def score_source(name: str, table: ScoreTable) -> PrecomputedTeacher:
    """Scorer teacher ``name``'s outputs read from ``table``; a batch without (query, passages)
    tuples is an error (a scorer teaches tuples only: ``data.stream=tuples`` or ``both``)."""
    return PrecomputedTeacher(name, table, score_rows, fallback=_NoTuples(name))


class _NoTuples(TeacherSource):
    def __init__(self, name: str):
        self.name = name

    def outputs(self, batch: dict) -> Outputs:
        raise KdkitError(f"teacher '{self.name}' scores (query, passage) pairs: its distillers need "
                         "tuple batches with pool indices (data.stream=tuples or both)")


class ScorerOnTexts(TeacherSource):
    """The scorer run live on a tuple batch's texts, found by its pool rows in ``texts()`` (the
    pool texts in pool order): for probing a task before its table exists."""

    def __init__(self, name: str, scorer, texts: Callable[[], Sequence[str]]):
        self.name, self.scorer, self.texts = name, scorer, texts

    def outputs(self, batch: dict) -> Outputs:
        if "query_pool" not in batch or "passage_pool" not in batch:
            return _NoTuples(self.name).outputs(batch)
        texts = self.texts()
        q, p = batch["query_pool"].tolist(), batch["passage_pool"].tolist()
        g = len(p) // len(q)
        scores = self.scorer.score([texts[q[k // g]] for k in range(len(p))], [texts[d] for d in p])
        return Outputs(features={"scores": scores.reshape(len(q), g).to(batch["query_pool"].device)})


# ---- RocketQA denoising ---------------------------------------------------------------------------
def denoise(negatives: Sequence[Sequence[int]], positives: Sequence[set[int]], table: ScoreTable,
            threshold: float, keep_at_least: int = 0) -> tuple[list[list[int]], int]:
    """RocketQA's denoised hard negatives (Qu et al. 2021): a mined "negative" that a stronger
    model scores above the query's positive is likely an unlabeled positive, so it is dropped:
    drop n when ``s(q, n) - max_{p+} s(q, p+) > threshold``.

    A query keeps at least ``keep_at_least`` candidates (the tuples draw that many): when
    denoising would leave fewer, its lowest-scored dropped ones stay. Returns the kept
    candidates per query and how many were dropped.
    """
    kept, dropped = [], 0
    for q, (row, pos) in enumerate(zip(negatives, positives)):
        row = [int(d) for d in row]
        if not row:
            kept.append(row)
            continue
        qs = torch.full((len(row),), q, dtype=torch.long)
        s_neg = table.lookup(qs, torch.tensor(row)).cpu()
        best = table.lookup(torch.full((len(pos),), q, dtype=torch.long),
                            torch.tensor(sorted(pos), dtype=torch.long)).max().cpu()
        noisy = (s_neg - best) > threshold
        if int((~noisy).sum()) < keep_at_least:  # put back the least suspicious of the dropped
            back = s_neg.masked_fill(~noisy, float("inf")).argsort()[: keep_at_least - int((~noisy).sum())]
            noisy[back] = False
        kept.append([d for d, bad in zip(row, noisy.tolist()) if not bad])
        dropped += int(noisy.sum())
    return kept, dropped
