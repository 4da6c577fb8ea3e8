"""Several retrieval teachers: what each one computes before training, and who mines negatives.

``RetrievalTask.setup`` hands its teachers here once per stage:

- a bi-encoder teacher (``TextEncoder``) gets its embedding table (``retrieval_table``), read by
  the pool rows of every batch field;
- a scorer teacher (``kdkit.models.scorers``) gets its score table (``retrieval_scores``) of
  every (train query, positive or candidate passage) pair, read as ``features["scores"]``;
- hard negatives are mined from one bi-encoder teacher's ranking: ``negatives_from``, else the
  first bi-encoder teacher; with scorer teachers only, from the student's own initial
  embeddings (its untrained ranking: the scorer then says how hard each candidate is);
- with ``denoise_threshold`` set, RocketQA's denoising drops candidates the scorer (the first
  scorer teacher; without one the mining bi-encoder) scores above the query's positive;
- the asymmetric evaluation's corpus index is the mining bi-encoder's (else the first one's).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from kdkit.data_contract import StaticPool
from kdkit.errors import KdkitError, say
from kdkit.models.scorers import is_scorer
from kdkit.tasks.retrieval_scores import (build_score_table, candidate_pairs, denoise,
                                          embedding_score_table, pool_offset, score_source)
from kdkit.tasks.retrieval_table import EmbeddingCache, build_teacher_table, mine_negatives, teacher_source
from kdkit.teacher_source import TeacherSource


@dataclass
class TeacherPlan:
    """What the teachers computed for one stage.

    Args:
        sources: teacher name -> its precomputed source (embedding rows or pair scores).
        index: ``[N_docs, D]`` the asymmetric evaluation's teacher corpus index, or None.
        negatives: per train query, its negative candidates (None: no tuples).
        miner: who mined them (a teacher name, or "student").
        dropped: candidates removed by denoising (None: denoising off).
    """

    sources: dict[str, TeacherSource]
    index: Tensor | None
    negatives: list[list[int]] | None
    miner: str | None
    dropped: int | None


def split_teachers(teachers: Mapping[str, nn.Module]) -> tuple[list[str], list[str]]:
    """(bi-encoder teacher names, scorer teacher names), in the teachers' order."""
    scorers = [n for n, m in teachers.items() if is_scorer(m)]
    return [n for n in teachers if n not in scorers], scorers


def check_options(teachers: Mapping[str, nn.Module], negatives_from: str | None) -> None:
    """Raise before training when ``negatives_from`` names no bi-encoder teacher (stages without
    teachers, the teacher's and the baseline's, ignore both options: random negatives)."""
    if not teachers:
        return
    bi, scorers = split_teachers(teachers)
    if negatives_from is not None and negatives_from not in bi:
        kind = "a scorer (it cannot rank the corpus)" if negatives_from in scorers else "not a teacher of this run"
        raise KdkitError(f"task.negatives_from={negatives_from!r} is {kind}; bi-encoder teachers: "
                         f"{', '.join(bi) or 'none'}")


def prepare_teachers(teachers: Mapping[str, nn.Module], student: nn.Module, pool: StaticPool,
                     live: Callable[[str], TeacherSource], negatives_from: str | None = None,
                     denoise_threshold: float | None = None, keep_at_least: int = 0) -> TeacherPlan:
    """Tables of every teacher (``teachers``: name -> raw model) on ``pool``, the mined (and
    optionally denoised) negatives; ``live(name)`` is a bi-encoder's fallback for batches
    without pool rows."""
    bi, scorers = split_teachers(teachers)
    tuples = pool.negative_ranks is not None
    if scorers and not tuples:
        raise KdkitError(f"scorer teachers ({', '.join(scorers)}) score (query, passage) tuples: set "
                         "data.stream=tuples or both")
    if denoise_threshold is not None and not tuples:
        raise KdkitError("task.denoise_threshold denoises mined tuple negatives: set data.stream=tuples or both")
    tables = {name: build_teacher_table(teachers[name], pool) for name in bi}
    miner = negatives_from or (bi[0] if bi else None)
    negatives = None
    if tuples:
        if miner is None:
            miner, negatives = "student", mine_with(student, pool)
            say("hard negatives: mined from the student's initial embeddings (no bi-encoder teacher)")
        else:
            negatives = tables[miner].negatives
    sources: dict[str, TeacherSource] = {n: teacher_source(n, tables[n].rows, fallback=live(n)) for n in bi}
    dropped = None
    if negatives is not None and (scorers or denoise_threshold is not None):
        pairs = candidate_pairs(pool.positives, negatives)
        scored = {n: build_score_table(teachers[n], pool, pairs) for n in scorers}
        if denoise_threshold is not None:
            judge = scored[scorers[0]] if scorers else _embedding_judge(tables[miner].rows, pool, pairs)
            total = sum(len(row) for row in negatives)
            negatives, dropped = denoise(negatives, pool.positives, judge, float(denoise_threshold), keep_at_least)
            say(f"denoising (threshold {denoise_threshold}, by {scorers[0] if scorers else miner}): dropped "
                f"{dropped} of {total} mined negative candidates scored above their query's positive")
        sources.update({n: score_source(n, table) for n, table in scored.items()})
    index_of = miner if miner in tables else (bi[0] if bi else None)
    return TeacherPlan(sources, tables[index_of].index if index_of else None, negatives, miner, dropped)


def _embedding_judge(rows: Tensor, pool: StaticPool, pairs: Tensor):
    def rows_of(kind: str) -> Tensor:
        start = pool_offset(pool, kind)
        return rows[start:start + len(pool.texts[kind])]

    return embedding_score_table(rows_of(pool.query_kind), rows_of(pool.corpus_kind), pairs, pool)


def mine_with(encoder: nn.Module, pool: StaticPool) -> list[list[int]]:
    """Hard negatives from ``encoder``'s (e.g. the untrained student's) ranking of the corpus
    for each train query, at the ranks ``pool.negative_ranks`` (its embeddings cached like a
    teacher's)."""
    cache = EmbeddingCache(pool.cache_dir, pool.batch_size)
    fingerprint = encoder.fingerprint()
    emb = {kind: cache.embeddings(encoder, kind, pool.texts[kind], pool.target_max_length, fingerprint)
           for kind in (pool.corpus_kind, pool.query_kind)}
    return mine_negatives(emb[pool.query_kind], emb[pool.corpus_kind], pool.positives, pool.negative_ranks)
