"""Exact nearest-neighbour search and IR metrics (nDCG@10, Recall@100, MRR@10) through ranx.

The metrics come from ranx (Bassani, ECIR 2022), which reproduces trec_eval / pytrec_eval (what
BEIR and MTEB use); kdkit only does the search: a dot product between normalised embeddings is the
cosine similarity, and an exact top-k over it is what faiss ``IndexFlatIP`` returns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from kdkit.errors import KdkitError
from kdkit.extras import require

DEFAULT_METRICS = ("ndcg@10", "recall@100", "mrr@10")


def exact_search(queries: Tensor, corpus: Tensor, k: int, backend: str = "torch",
                 chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Top-``k`` corpus rows by inner product for every query: ``(scores, indices)``, ``[Q, k]``.

    Args:
        queries: ``[Q, D]`` query embeddings.
        corpus: ``[N, D]`` document embeddings (same space).
        k: hits per query (clipped to N).
        backend: "torch" (matrix product, in chunks of ``chunk`` queries) or "faiss"
            (``IndexFlatIP``, exact as well).
    """
    if queries.shape[-1] != corpus.shape[-1]:
        raise KdkitError(f"query dim {queries.shape[-1]} != corpus dim {corpus.shape[-1]}")
    k = min(int(k), corpus.shape[0])
    if backend == "faiss":
        faiss = require("faiss", "search backend=faiss")
        index = faiss.IndexFlatIP(corpus.shape[1])
        index.add(corpus.detach().float().cpu().contiguous().numpy())
        scores, indices = index.search(queries.detach().float().cpu().contiguous().numpy(), k)
        return torch.from_numpy(scores), torch.from_numpy(indices).long()
    if backend != "torch":
        raise KdkitError(f"search backend={backend!r}: use torch or faiss")
    corpus = corpus.detach().float()
    parts = [torch.topk(q.detach().float().to(corpus.device) @ corpus.T, k, dim=1)
             for q in queries.split(chunk)]
    return torch.cat([p.values for p in parts]).cpu(), torch.cat([p.indices for p in parts]).cpu()


def to_run(query_ids: Sequence[str], doc_ids: Sequence[str], scores: Tensor,
           indices: Tensor) -> dict[str, dict[str, float]]:
    """``{query_id: {doc_id: score}}`` from a search result (the TREC run format)."""
    return {qid: {doc_ids[j]: float(s) for j, s in zip(idx.tolist(), sc.tolist())}
            for qid, sc, idx in zip(query_ids, scores, indices)}


def evaluate(qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]],
             metrics: Sequence[str] = DEFAULT_METRICS) -> dict[str, float]:
    """ranx metrics of ``run`` against ``qrels``, averaged over the queries of ``qrels``.

    Documents with relevance <= 0 are not relevant (ranx drops them, as trec_eval).
    A query of ``qrels`` absent from ``run`` scores 0.
    """
    ranx = require("ranx", "retrieval metrics (nDCG, recall)")
    Qrels, Run, ranx_evaluate = ranx.Qrels, ranx.Run, ranx.evaluate

    judged = {q: {d: int(r) for d, r in docs.items() if int(r) > 0} for q, docs in qrels.items()}
    judged = {q: docs for q, docs in judged.items() if docs}
    if not judged:
        raise KdkitError("no query has a relevant document in the qrels")
    # ranx needs every qrels query in the run; an empty list there is a miss.
    full_run = {q: dict(run.get(q, {})) or {"__none__": 0.0} for q in judged}
    scores = ranx_evaluate(Qrels(judged), Run(full_run), list(metrics), make_comparable=True)
    if isinstance(scores, float):  # ranx returns a bare float for a single metric
        scores = {metrics[0]: scores}
    return {name: float(value) for name, value in scores.items()}


def retrieval_metrics(query_emb: Tensor, corpus_emb: Tensor, query_ids: Sequence[str],
                      doc_ids: Sequence[str], qrels: Mapping[str, Mapping[str, int]],
                      metrics: Sequence[str] = DEFAULT_METRICS, backend: str = "torch") -> dict[str, float]:
    """Search ``corpus_emb`` with ``query_emb`` exactly, then score the run with ranx.

    The search depth is the largest cut-off among ``metrics`` (100 for recall@100).
    """
    if len(query_ids) != len(query_emb) or len(doc_ids) != len(corpus_emb):
        raise KdkitError(f"{len(query_ids)} query ids for {len(query_emb)} embeddings, "
                         f"{len(doc_ids)} doc ids for {len(corpus_emb)} embeddings")
    depth = max(int(m.split("@")[1]) if "@" in m else 1000 for m in metrics)
    scores, indices = exact_search(query_emb, corpus_emb, depth, backend=backend)
    return evaluate(qrels, to_run(query_ids, doc_ids, scores, indices), metrics)
