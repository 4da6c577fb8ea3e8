"""Scorer teachers in the retrieval task: the score table, several teachers, denoising, mining."""

import json

import pytest
import torch

from kdkit.distillers.embed import Embed
from kdkit.distillers.group_scores import group_scores
from kdkit.distillers.margin_mse import MarginMSE, margin_mse_scores
from kdkit.errors import KdkitError
from kdkit.models.scorers import MaxSimScorer
from kdkit.tasks.retrieval_scores import ScoreTable, candidate_pairs, denoise
from kdkit.tasks.retrieval_table import build_teacher_table, mine_negatives

from .test_retrieval import datamodule, make_task, models, toy, trainer  # noqa: F401 (toy: a fixture)

TUPLES = dict(stream="both", num_negatives=2, negative_ranks=(1, 6))


def scorer_of(teacher):
    return MaxSimScorer(teacher, query_max_length=16, reduction="mean")


def by_hand_scores(dm, scorer, batch):
    """The scorer run directly on the batch's texts, ``[B, G]``."""
    texts = dm.pool_texts
    q, p = batch["query_pool"].tolist(), batch["passage_pool"].tolist()
    g = len(p) // len(q)
    return scorer.score([texts[q[k // g]] for k in range(len(p))], [texts[d] for d in p]).reshape(len(q), g)


def two_teacher_task(toy, **kwargs):  # noqa: F811
    teacher, student = models(toy)
    scorer = scorer_of(teacher)
    distillers = {"embed": Embed().reading("bi"), "margin_mse": MarginMSE().reading("maxsim")}
    task = make_task(student, teachers={"bi": teacher, "maxsim": scorer}, distillers=distillers, **kwargs)
    return task, teacher, scorer


def test_score_table_rows_are_the_scorers_scores_and_the_scorer_never_runs_in_training(toy, monkeypatch):  # noqa: F811
    dm = datamodule(toy, **TUPLES)
    task, teacher, scorer = two_teacher_task(toy)
    trainer(max_steps=1).fit(task, datamodule=dm)  # scores the pairs once (cached on disk)
    batch = dm.example_batch(n=3)
    got = task.teacher_outputs(batch, "maxsim").features["scores"]
    torch.testing.assert_close(got, by_hand_scores(dm, scorer, batch), atol=1e-5, rtol=0)
    # every pair a tuple can hold is in the table: positives and all mined candidates
    mined = build_teacher_table(teacher, dm.static_pool()).negatives
    assert len(task.teacher_sources["maxsim"].table) == len(candidate_pairs(dm.train_positives, mined))
    bad = dict(batch, passage_pool=batch["passage_pool"].clone())
    bad["passage_pool"][1] = next(d for d in range(dm.num_docs) if d not in mined[0] and d not in dm.train_positives[0])
    bad["query_pool"] = batch["query_pool"].clone()
    bad["query_pool"][0] = dm.num_docs  # train query 0
    with pytest.raises(KdkitError, match="no score for train query 0"):
        task.teacher_outputs(bad, "maxsim")
    # a second run reads the cached table: the scorer does not run at all
    again, _, scorer2 = two_teacher_task(toy)
    monkeypatch.setattr(type(scorer2), "forward", lambda *a: pytest.fail("scorer ran after its table was cached"))
    trainer(max_steps=2).fit(again, datamodule=dm)


def test_each_distiller_reads_the_teacher_it_names(toy, monkeypatch):  # noqa: F811
    dm = datamodule(toy, **TUPLES)
    task, _, scorer = two_teacher_task(toy)
    seen = {}
    for name, d in task.distillers.items():
        forward = d.forward
        monkeypatch.setattr(d, "forward", lambda s, t, b, n=name, f=forward: seen.setdefault(n, set(t.features))
                            and f(s, t, b))
    t = trainer(max_steps=2, log_every_n_steps=1)
    t.fit(task, datamodule=dm)
    assert seen == {"embed": {"text", "query", "passage"}, "margin_mse": {"scores"}}
    assert {"train/loss/embed", "train/loss/margin_mse"} <= set(t.callback_metrics)
    batch = dm.example_batch(n=3)
    with torch.no_grad():
        terms, s = task.losses(batch)
        expected = margin_mse_scores(group_scores(s.features["query"], s.features["passage"]),
                                     by_hand_scores(dm, scorer, batch))
    assert terms["margin_mse"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert task._teacher_index is not None  # the bi-encoder's index: asymmetric evaluation


def test_denoise_drops_exactly_the_candidates_scored_above_the_positive():
    # query 0: positive 0 (score 1.0); query 1: positives 1 (0.2) and 5 (0.9, the best)
    pairs = torch.tensor([[0, 0], [0, 2], [0, 3], [0, 4], [1, 1], [1, 5], [1, 0], [1, 3]])
    scores = torch.tensor([1.0, 1.6, 1.4, 0.1, 0.2, 0.9, 1.0, 1.41])
    table = ScoreTable(pairs, scores, num_docs=6, query_offset=6)
    negatives, positives = [[2, 3, 4], [0, 3]], [{0}, {1, 5}]
    kept, dropped = denoise(negatives, positives, table, threshold=0.5)
    assert kept == [[3, 4], [0]] and dropped == 2  # 1.6 - 1.0 > 0.5; 1.41 - 0.9 > 0.5
    kept, dropped = denoise(negatives, positives, table, threshold=0.0, keep_at_least=2)
    # query 0 would keep [4] only: its least suspicious dropped candidate (3, 1.4) comes back
    assert kept == [[3, 4], [0, 3]] and dropped == 1
    torch.testing.assert_close(table.group(torch.tensor([6, 7]), torch.tensor([0, 2, 5, 3])),
                               torch.tensor([[1.0, 1.6], [0.9, 1.41]]))


def test_denoising_in_setup_drops_what_a_loop_over_direct_scores_drops(toy):  # noqa: F811
    dm = datamodule(toy, **TUPLES)
    teacher, _ = models(toy)
    scorer = scorer_of(teacher)
    dm.setup("fit")
    texts, n_docs = dm.pool_texts, dm.num_docs
    mined = build_teacher_table(teacher, dm.static_pool()).negatives
    pairs = [(q, d) for q, (row, pos) in enumerate(zip(mined, dm.train_positives)) for d in [*pos, *row]]
    direct = scorer.score([texts[n_docs + q] for q, _ in pairs], [texts[d] for _, d in pairs]).tolist()
    score = dict(zip(pairs, direct))
    margins = [[score[q, d] - max(score[q, p] for p in pos) for d in row]
               for q, (row, pos) in enumerate(zip(mined, dm.train_positives))]
    threshold = sorted(m for row in margins for m in row)[len(mined) * 5 // 2]  # about half go
    expected = []
    for row, m in zip(mined, margins):
        keep = [d for d, x in zip(row, m) if x <= threshold]
        if len(keep) < 2:  # each query keeps num_negatives: the lowest-scored dropped ones return
            back = sorted((x, d) for d, x in zip(row, m) if x > threshold)[:2 - len(keep)]
            keep = [d for d in row if d in keep or d in {b for _, b in back}]
        expected.append(keep)
    task, _, _ = two_teacher_task(toy, denoise_threshold=threshold)
    trainer(max_steps=1).fit(task, datamodule=dm)
    assert dm.negatives == expected
    assert task.denoised == sum(len(r) for r in mined) - sum(len(r) for r in expected) > 0


def test_a_scorer_only_run_mines_with_the_students_initial_embeddings(toy):  # noqa: F811
    dm = datamodule(toy, **TUPLES)
    teacher, student = models(toy)
    dm.setup("fit")
    corpus = student.encode(dm.pool_texts[:dm.num_docs])
    queries = student.encode(dm.train_query_texts)
    expected = mine_negatives(queries, corpus, dm.train_positives, (1, 6))
    task = make_task(student, teachers={"maxsim": scorer_of(teacher)}, distillers={"margin_mse": MarginMSE()})
    trainer(max_steps=1).fit(task, datamodule=dm)
    assert dm.negatives == expected
    assert task._teacher_index is None  # no bi-encoder teacher: no asymmetric index


def test_option_errors(toy):  # noqa: F811
    teacher, student = models(toy)
    teachers = {"bi": teacher, "maxsim": scorer_of(teacher)}
    with pytest.raises(KdkitError, match="negatives_from='maxsim' is a scorer"):
        make_task(student, teachers=teachers, distillers={"embed": Embed().reading("bi")}, negatives_from="maxsim")
    with pytest.raises(KdkitError, match="not a teacher"):
        make_task(student, teachers=teachers, distillers={"embed": Embed().reading("bi")}, negatives_from="x")
    task = make_task(student, teachers=teachers, distillers={"embed": Embed().reading("bi")})
    with pytest.raises(KdkitError, match="stream=tuples or both"):
        trainer(max_steps=1).fit(task, datamodule=datamodule(toy, stream="text"))


def test_pipeline_smoke_run(toy, compose_run):  # noqa: F811
    """kdkit-train experiment=scifact_minilm_scorer on the toy data and tiny models."""
    folder, teacher_dir, cache = toy
    cfg, results = compose_run(
        "experiment=scifact_minilm_scorer", f"data.path={folder}", f"paths.cache_dir={cache}",
        f"teachers.bi.model.name_or_path={teacher_dir}", f"teachers.maxsim.model.name_or_path={teacher_dir}",
        "student.model.layers=[0,3]", "data.batch_size=4", "data.eval_batch_size=8",
        "task.throughput_passages=8", "task.throughput_repeats=1")
    assert set(results) == {"teacher/bi", "student"}  # the scorer has no stage of its own
    student = results["student"]
    assert {"test/ndcg@10", "test/asym/ndcg@10", "speedup", "denoised_negatives"} <= set(student)
    assert student["denoised_negatives"] >= 0
    assert json.loads(open(f"{cfg.paths.output_dir}/results.json").read()) == results
