"""The retrieval teacher's table: its embedding of every static training text, computed once.

In dense-retrieval distillation the teacher's inputs are static texts (corpus passages, train
queries, sentences cut from passages), so the teacher encodes each of them once, before
training, and the task reads rows of the result by the ``*_pool`` indices every batch carries:
training never runs the teacher. The datamodule runs no model: it describes the texts
(``RetrievalData.static_pool``) and takes back data (``use_negatives``); everything that runs
the teacher is here, on the task's side:

- ``build_teacher_table(teacher, pool)``: the table (the pool texts at ``target_max_length``),
  the asymmetric evaluation's corpus index (the corpus at the teacher's own length), and the
  hard negatives mined from the teacher's ranking (``mine_negatives``) when the stream has
  tuples.
- ``EmbeddingCache``: embeddings of static text sets on disk, under the encoder's weight
  fingerprint (``TextEncoder.fingerprint``) and the token length: a teacher's are computed once
  per dataset, an untrained student's corpus encoding once per evaluation length.
- ``teacher_source(name, table, fallback)``: the ``PrecomputedTeacher`` that looks the rows up
  (``table_rows``).
- ``static_embeddings(data, encoder, kind)``: one static text set's embeddings through the same
  cache, for scripts.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from kdkit.checkpoint_io import save_atomically
from kdkit.data_contract import StaticPool
from kdkit.errors import KdkitError, unreadable
from kdkit.outputs import Outputs
from kdkit.teacher_source import PrecomputedTeacher, TeacherSource

FIELDS = ("text", "query", "passage")  # the text fields of a retrieval batch


class EmbeddingCache:
    """Embeddings of static text sets, one file per (set, encoder, length):
    ``<folder>/<kind>-<fingerprint[:16]>-L<max_length>.pt`` (float32 ``[N, D]``).

    ``folder`` is the data's own (``StaticPool.cache_dir``: it names the data's fingerprint), so
    a set name (``kind``) stands for the same texts wherever the folder is the same. A file whose
    row count differs from the texts' is stale and encoded again.
    """

    def __init__(self, folder: str | Path, batch_size: int = 64):
        self.folder = Path(folder)
        self.batch_size = int(batch_size)

    def path(self, encoder, kind: str, max_length: int | None = None, fingerprint: str | None = None) -> Path:
        fingerprint = fingerprint or encoder.fingerprint()
        return self.folder / f"{kind}-{fingerprint[:16]}-L{max_length or encoder.max_length}.pt"

    def load(self, encoder, kind: str, max_length: int | None = None,
             fingerprint: str | None = None) -> Tensor | None:
        """``encoder``'s cached embeddings of ``kind`` at ``max_length`` (None: its own), or None."""
        path = self.path(encoder, kind, max_length, fingerprint)
        if not path.is_file():
            return None
        try:
            return torch.load(path, weights_only=True)
        except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as err:
            hint = ("make it readable for this user (check its permissions)" if isinstance(err, PermissionError)
                    else "delete it: kdkit encodes the texts again")
            raise unreadable(path, "cached teacher embeddings", err, hint) from None

    def store(self, encoder, kind: str, embeddings: Tensor, max_length: int | None = None,
              fingerprint: str | None = None) -> Path:
        """Cache ``embeddings`` of ``kind`` under ``encoder``'s fingerprint (atomic write)."""
        return save_atomically(embeddings.detach().float().cpu().contiguous(),
                               self.path(encoder, kind, max_length, fingerprint))

    def embeddings(self, encoder, kind: str, texts: Sequence[str], max_length: int | None = None,
                   fingerprint: str | None = None) -> Tensor:
        """Embeddings of ``texts`` (the set ``kind``) by ``encoder`` at ``max_length`` (None: its
        own): from the cache, else encoded (and cached)."""
        cached = self.load(encoder, kind, max_length, fingerprint)
        if cached is not None and len(cached) == len(texts):
            return cached
        emb = encoder.encode(list(texts), batch_size=self.batch_size, progress=True, max_length=max_length,
                             desc=f"teacher {kind}")
        self.store(encoder, kind, emb, max_length, fingerprint)
        return emb


@dataclass
class TeacherTable:
    """What the retrieval teacher computes once per dataset.

    Args:
        rows: ``[N_pool, D]`` its embeddings of the pool texts at the target length (row ``i``
            for pool index ``i``: the targets the batches' ``*_pool`` indices address).
        index: ``[N_docs, D]`` its corpus embeddings at its own length (the index of the
            asymmetric evaluation, whatever length the targets use).
        negatives: per train query, the corpus rows at ranks ``[lo, hi)`` of its ranking
            (positives removed); None when the stream has no tuples.
    """

    rows: Tensor
    index: Tensor
    negatives: list[list[int]] | None


def build_teacher_table(teacher, pool: StaticPool) -> TeacherTable:
    """Encode ``pool``'s texts with ``teacher`` (a ``TextEncoder``), or read them from the cache in
    ``pool.cache_dir``, and mine hard negatives from its ranking."""
    cache = EmbeddingCache(pool.cache_dir, pool.batch_size)
    fingerprint = teacher.fingerprint()

    def embed(kind: str, max_length: int | None) -> Tensor:
        return cache.embeddings(teacher, kind, pool.texts[kind], max_length, fingerprint)

    corpus = embed(pool.corpus_kind, pool.target_max_length)
    index = embed(pool.corpus_kind, None)  # the teacher's own length (the same file when no target length)
    parts = {pool.corpus_kind: corpus}
    parts.update({kind: embed(kind, pool.target_max_length) for kind in pool.texts if kind != pool.corpus_kind})
    rows = torch.cat([parts[kind] for kind in pool.texts])
    negatives = None
    if pool.negative_ranks is not None:
        negatives = mine_negatives(parts[pool.query_kind], corpus, pool.positives, pool.negative_ranks)
    return TeacherTable(rows, index, negatives)


def static_embeddings(data, encoder, kind: str, max_length: int | None = None) -> Tensor:
    """``encoder``'s embeddings of ``data.static_texts(kind)`` (e.g. ``"corpus"``, the test
    queries) at ``max_length`` (None: its own), from the data's embedding cache or encoded:
    for scripts re-reading what runs cached (``benchmarks/retrieval.py``)."""
    pool = data.static_pool()
    return EmbeddingCache(pool.cache_dir, pool.batch_size).embeddings(encoder, kind, data.static_texts(kind),
                                                                      max_length)


def mine_negatives(query_emb: Tensor, doc_emb: Tensor, positives: Sequence[set[int]],
                   ranks: Sequence[int] = (3, 30)) -> list[list[int]]:
    """Per query, the docs at ranks ``[lo, hi)`` of the teacher's ranking once positives are removed.

    Skipping the very top (``lo``) keeps out many unlabeled relevant passages (false negatives),
    as in RocketQA's denoised hard negatives; rank 0 is the hardest non-positive.
    """
    lo, hi = int(ranks[0]), int(ranks[1])
    if not 0 <= lo < hi:
        raise KdkitError(f"negative_ranks={list(ranks)}: need 0 <= lo < hi")
    depth = min(hi + max((len(p) for p in positives), default=0), doc_emb.shape[0])
    top = torch.topk(query_emb.float() @ doc_emb.float().T, depth, dim=1).indices.tolist()
    return [[d for d in row if d not in pos][lo:hi] for row, pos in zip(top, positives)]


# ---- reading the table ----------------------------------------------------------------------------
def embedding_outputs(feats: dict[str, Tensor]) -> Outputs:
    """``Outputs`` of per-field embeddings: passages reshaped to ``[B, G, D]`` beside queries;
    ``embedding`` = the text embeddings, else the query embeddings."""
    if "passage" in feats and "query" in feats:
        q = feats["query"]
        feats["passage"] = feats["passage"].reshape(q.shape[0], -1, feats["passage"].shape[-1])
    return Outputs(embedding=feats.get("text", feats.get("query")), features=feats)


def table_rows(table: Tensor, batch: dict) -> Outputs | None:
    """The teacher's precomputed embeddings of the batch's texts (None: no table rows)."""
    fields = [f for f in FIELDS if f"{f}_input_ids" in batch]
    if not all(f"{f}_pool" in batch for f in fields):
        return None
    return embedding_outputs({f: table[batch[f"{f}_pool"]] for f in fields})


def teacher_source(name: str, table: Tensor, fallback: TeacherSource | None = None) -> PrecomputedTeacher:
    """Teacher ``name``'s outputs as rows of ``table`` (``TeacherTable.rows``); a batch without
    pool indices goes to ``fallback``."""
    return PrecomputedTeacher(name, table, table_rows, fallback=fallback)
