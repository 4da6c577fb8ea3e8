"""Multi-exit retrieval students through the task: per-layer features for distillers (student and
live teacher), evaluation per exit, export cut at an exit, and the scifact_minilm_exits run."""

import json

import pytest
import torch

from kdkit.distillers.embed import Embed
from kdkit.distillers.lead import Lead
from kdkit.distillers.multi_exit import MultiExit
from kdkit.errors import KdkitError
from kdkit.models.text import TextEncoder, from_teacher_layers, hf_encoder
from kdkit.models.text_layers import cut_at_exit
from kdkit.retrieval_metrics import retrieval_metrics
from kdkit.teacher_source import PrecomputedTeacher

from .test_retrieval import datamodule, make_task, toy, toy_data, trainer  # noqa: F401 (toy: fixture)


def three_layer(toy):
    torch.manual_seed(0)
    return from_teacher_layers(str(toy[1]), layers=[0, 1, 3]), from_teacher_layers(str(toy[1]), layers=[0, 1, 2, 3])


def test_each_exit_scores_like_a_direct_search_with_the_cut_model(toy, tmp_path):
    student, teacher = three_layer(toy)
    task = make_task(student, teacher, {"embed": Embed()}, eval_exits=[0, 1, 2], export_exits=[0])
    got = trainer().test(task, datamodule=datamodule(toy), verbose=False)[0]
    data = toy_data()
    test_ids = sorted(data.qrels["test"])
    for k in (0, 1):
        cut = cut_at_exit(student, k)
        expected = retrieval_metrics(cut.encode([data.queries[q] for q in test_ids]), cut.encode(data.doc_texts),
                                     test_ids, data.doc_ids, data.qrels["test"])
        for name in ("ndcg@10", "recall@100", "mrr@10"):
            assert got[f"test/{name}@exit{k}"] == pytest.approx(expected[name], abs=1e-6)
    for name in ("ndcg@10", "recall@100", "mrr@10"):  # the top exit is the whole model
        assert got[f"test/{name}@exit2"] == pytest.approx(got[f"test/{name}"], abs=1e-6)
    assert got["test/ndcg@10@exit0"] != got["test/ndcg@10"]

    from sentence_transformers import SentenceTransformer

    paths = task.export(tmp_path / "export")
    assert paths == [tmp_path / "export", tmp_path / "export" / "exit0"]
    texts = data.doc_texts[:5]
    enc = student.tokenize(texts)
    with torch.no_grad():
        _, per_exit = student.eval().forward_exits(enc["input_ids"], enc["attention_mask"], [0])
    st = SentenceTransformer(str(paths[1]), device="cpu")
    torch.testing.assert_close(torch.from_numpy(st.encode(texts)), per_exit[0], atol=1e-5, rtol=0)
    assert json.loads((paths[1] / "config.json").read_text())["num_hidden_layers"] == 1
    with pytest.raises(KdkitError, match="blocks 0..2"):
        make_task(student, teacher, eval_exits=[3])


def test_inference_report_times_each_exit_as_its_cut_model(toy):
    student, teacher = three_layer(toy)
    task = make_task(student, teacher, {"embed": Embed()}, eval_exits=[0, 1])
    dm = datamodule(toy)
    trainer().test(task, datamodule=dm, verbose=False)
    timed = []  # the depth of every encoder the report runs
    for module in (student, teacher):
        module.register_forward_pre_hook(lambda m, args: timed.append(m.num_layers))
    original = TextEncoder.forward

    def spy(self, *args):
        if self is not student and self is not teacher:
            timed.append(self.num_layers)
        return original(self, *args)

    TextEncoder.forward = spy
    try:
        report = task.inference_report(dm.example_batch())
    finally:
        TextEncoder.forward = original
    assert set(timed) == {1, 2, 3, 4}  # cut after block 0, after block 1, the whole student, the teacher
    assert student.num_layers == 3  # the cuts are copies
    for k in (0, 1):
        assert report[f"passages_per_s@exit{k}"] > 0
        assert report[f"speedup@exit{k}"] == pytest.approx(report[f"passages_per_s@exit{k}"]
                                                           / report["teacher_passages_per_s"])
    assert "passages_per_s@exit2" not in report


def test_multi_exit_trains_through_the_task_and_plain_runs_pay_nothing(toy, monkeypatch):
    student, teacher = three_layer(toy)
    plain = make_task(student, teacher, {"embed": Embed()})
    calls = []
    forward_exits = TextEncoder.forward_exits
    monkeypatch.setattr(TextEncoder, "forward_exits", lambda *a: calls.append(1) or forward_exits(*a))
    dm = datamodule(toy, stream="text")
    trainer(max_steps=1).fit(plain, datamodule=dm)
    assert calls == []  # nobody reads per-layer features: the plain forward
    task = make_task(student, teacher, {"embed": Embed(), "multi_exit": MultiExit(exits=[0, 1], teacher_weight=0)})
    t = trainer(max_steps=2, log_every_n_steps=1)
    t.fit(task, datamodule=dm)
    assert calls and {"train/loss/multi_exit/exit0", "train/loss/multi_exit/exit1"} <= set(t.callback_metrics)
    assert isinstance(task.teacher_sources["teacher"], PrecomputedTeacher)  # the student's layers only
    batch = dm.example_batch(n=2)
    student.eval()  # no dropout
    with torch.no_grad():
        out = task.student_outputs(batch)
        cut = cut_at_exit(student, 0)(batch["text_input_ids"], batch["text_attention_mask"])
    torch.testing.assert_close(out.features["text@0"], cut, atol=1e-6, rtol=0)
    assert out.features["text@0"].shape == out.features["text"].shape


def test_lead_runs_the_teacher_live_for_its_layers(toy):
    student, teacher = three_layer(toy)
    dm = datamodule(toy, stream="tuples", num_negatives=2, negative_ranks=(1, 6))
    task = make_task(student, teacher, {"lead": Lead(num_layers=2, resample_every=1)})
    t = trainer(max_steps=2, log_every_n_steps=1)
    t.fit(task, datamodule=dm)
    assert "train/loss/lead" in t.callback_metrics
    assert not isinstance(task.teacher_sources["teacher"], PrecomputedTeacher)
    out = task.teacher_outputs(dm.example_batch(n=2))
    assert {f"{f}@{k}" for f in ("query", "passage") for k in range(4)} <= set(out.features)
    other = hf_encoder(config=dict(model_type="bert", vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=64, max_position_embeddings=64),
                       pretrained=False, tokenizer=str(toy[1]))
    other.tokenizer.add_tokens(["kdkit-only-token"])  # now it reads other tokens than the teacher
    with pytest.raises(KdkitError, match="tokenizers differ"):
        make_task(other, teacher, {"lead": Lead()})


def test_pipeline_smoke_run(toy, compose_run):
    """kdkit-train experiment=scifact_minilm_exits on the toy data and tiny models."""
    folder, teacher_dir, cache = toy
    cfg, results = compose_run(
        "experiment=scifact_minilm_exits", f"data.path={folder}", f"paths.cache_dir={cache}",
        f"teacher.model.name_or_path={teacher_dir}", "student.model.layers=[0,1,3]",
        "data.batch_size=4", "data.eval_batch_size=8", "task.throughput_passages=8", "task.throughput_repeats=1")
    assert {"test/ndcg@10", "test/ndcg@10@exit0", "test/ndcg@10@exit1"} <= set(results["student"])
    from sentence_transformers import SentenceTransformer

    for k in (0, 1):
        cut = SentenceTransformer(f"{cfg.paths.output_dir}/export/exit{k}", device="cpu")
        assert cut.get_embedding_dimension() == 32 and cut[0].auto_model.config.num_hidden_layers == k + 1
