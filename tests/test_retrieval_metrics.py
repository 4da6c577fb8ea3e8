"""Exact search and the ranx metrics, against values computed by hand."""

import math

import pytest
import torch

from kdkit.errors import KdkitError
from kdkit.retrieval_metrics import evaluate, exact_search, retrieval_metrics, to_run


def ndcg_by_hand(ranking, rels, k):
    """trec_eval nDCG@k with linear gains: sum rel_i / log2(i + 1) over ranks i = 1..k."""
    dcg = sum(rels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranking[:k]))
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal[:k]))
    return dcg / idcg


def test_metrics_match_hand_computation():
    qrels = {"q1": {"d1": 1, "d2": 1}, "q2": {"d3": 2, "d5": 1, "d9": 0}}
    run = {"q1": {"d3": 0.9, "d1": 0.8, "d4": 0.7, "d2": 0.6},
           "q2": {"d4": 0.9, "d5": 0.8, "d3": 0.1}}
    got = evaluate(qrels, run, ["ndcg@10", "recall@100", "mrr@10", "ndcg@2", "recall@2"])
    # q1: hits at ranks 2 and 4: DCG = 1/log2(3) + 1/log2(5), IDCG = 1 + 1/log2(3).
    q1 = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert q1 == pytest.approx(ndcg_by_hand(["d3", "d1", "d4", "d2"], qrels["q1"], 10))
    # q2 (graded): d5 (rel 1) at rank 2, d3 (rel 2) at rank 3; ideal order d3, d5.
    q2 = (1 / math.log2(3) + 2 / math.log2(4)) / (2 + 1 / math.log2(3))
    assert got["ndcg@10"] == pytest.approx((q1 + q2) / 2, abs=1e-9)
    assert got["mrr@10"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert got["recall@100"] == pytest.approx(1.0)
    assert got["recall@2"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    q1_at2 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    q2_at2 = (1 / math.log2(3)) / (2 + 1 / math.log2(3))
    assert got["ndcg@2"] == pytest.approx((q1_at2 + q2_at2) / 2, abs=1e-9)


def test_query_missing_from_run_scores_zero_and_unjudged_queries_are_ignored():
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1}, "q3": {"d3": 0}}
    got = evaluate(qrels, {"q1": {"d1": 1.0}}, ["mrr@10", "recall@100"])
    assert got == {"mrr@10": pytest.approx(0.5), "recall@100": pytest.approx(0.5)}
    with pytest.raises(KdkitError, match="no query has a relevant"):
        evaluate({"q": {"d": 0}}, {"q": {"d": 1.0}})


def test_exact_search_torch_and_faiss_agree_with_argsort():
    g = torch.Generator().manual_seed(0)
    q, c = torch.randn(7, 5, generator=g), torch.randn(40, 5, generator=g)
    scores, idx = exact_search(q, c, k=6, chunk=3)  # chunks of 3 queries: 3 + 3 + 1
    full = q @ c.T
    expected = torch.argsort(full, dim=1, descending=True)[:, :6]
    assert torch.equal(idx, expected)
    assert torch.allclose(scores, full.gather(1, expected))
    f_scores, f_idx = exact_search(q, c, k=6, backend="faiss")
    assert torch.equal(f_idx, expected) and torch.allclose(f_scores, scores, atol=1e-5)
    assert exact_search(q, c, k=100)[1].shape == (7, 40)  # k clipped to the corpus size
    with pytest.raises(KdkitError, match="dim"):
        exact_search(q, torch.randn(3, 4), k=1)
    with pytest.raises(KdkitError, match="backend"):
        exact_search(q, c, k=1, backend="annoy")


def test_retrieval_metrics_end_to_end_on_orthogonal_embeddings():
    # Query i is the unit vector e_i; doc j is e_(j mod 4) scaled down with j: q0 ranks d0 then d4.
    eye = torch.eye(4)
    docs = torch.stack([eye[j % 4] * (1.0 - 0.1 * j) for j in range(8)])
    doc_ids = [f"d{j}" for j in range(8)]
    qrels = {"q0": {"d4": 1}, "q1": {"d1": 1}}
    run = to_run(["q0", "q1"], doc_ids, *exact_search(eye[:2], docs, k=2))
    assert list(run["q0"]) == ["d0", "d4"] and list(run["q1"]) == ["d1", "d5"]
    got = retrieval_metrics(eye[:2], docs, ["q0", "q1"], doc_ids, qrels, ["mrr@10", "ndcg@10"])
    assert got["mrr@10"] == pytest.approx((1 / 2 + 1) / 2)
    assert got["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1) / 2)
    with pytest.raises(KdkitError, match="query ids"):
        retrieval_metrics(eye[:2], docs, ["q0"], doc_ids, qrels)
