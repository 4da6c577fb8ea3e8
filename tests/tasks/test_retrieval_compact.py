"""Compact and Matryoshka students on toy BEIR data: metrics at truncated widths, a low-dimensional
student distilled through a loss-only projection, and the scifact_minilm_matryoshka experiment."""

import json

import pytest
import torch
import torch.nn.functional as F

from kdkit.distillers.embed import Embed
from kdkit.distillers.matryoshka import Matryoshka
from kdkit.errors import KdkitError
from kdkit.models.text import from_teacher_layers
from kdkit.retrieval_metrics import retrieval_metrics
from tests.tasks.test_retrieval import datamodule, make_task, models, toy, toy_data, trainer  # noqa: F401


def test_metrics_at_truncated_dims_equal_a_direct_search(toy):
    teacher, student = models(toy)
    task = make_task(student, teacher, {"embed": Embed()}, eval_dims=[16, 8, 32, 64])
    got = trainer().test(task, datamodule=datamodule(toy), verbose=False)[0]
    data = toy_data()
    test_ids = sorted(data.qrels["test"])
    queries, docs = student.encode([data.queries[q] for q in test_ids]), student.encode(data.doc_texts)
    for d in (16, 8):
        cut = retrieval_metrics(F.normalize(queries[:, :d], dim=-1), F.normalize(docs[:, :d], dim=-1),
                                test_ids, data.doc_ids, data.qrels["test"])
        for name in ("ndcg@10", "recall@100", "mrr@10"):
            assert got[f"test/{name}@d{d}"] == pytest.approx(cut[name], abs=1e-6)
    # widths at or above the model's (32) would repeat the full figures: not reported
    assert not [k for k in got if k.endswith(("@d32", "@d64"))]
    assert got["test/ndcg@10@d8"] != got["test/ndcg@10"]  # a real cut, not the full search again
    with pytest.raises(KdkitError, match="distinct positive integers"):
        make_task(student, eval_dims=[16, 0])


def test_compact_student_learns_through_a_projection_it_does_not_export(toy, tmp_path):
    """A 16-d student (projection_dim) of a 32-d teacher: embed compares it through a learned
    Linear(16, 32) that trains with it; the export is the student's own 16-d encoder."""
    from sentence_transformers import SentenceTransformer

    teacher, _ = models(toy)
    torch.manual_seed(0)
    student = from_teacher_layers(str(toy[1]), layers=[0, 3], projection_dim=16)
    dm = datamodule(toy, stream="text")
    with pytest.raises(KdkitError, match="embed.project=true"):
        trainer(max_steps=1).fit(make_task(student, teacher, {"embed": Embed()}), datamodule=dm)
    task = make_task(student, teacher, {"embed": Embed(project=True), "matryoshka": Matryoshka(dims=[16, 8])})
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer(max_steps=4).fit(task, datamodule=dm)
    projection = task.distillers["embed"].projection
    assert (projection.in_features, projection.out_features) == (16, 32)
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in before.items())
    got = trainer().test(task, datamodule=dm, verbose=False)[0]
    assert "test/ndcg@10" in got and "test/asym/ndcg@10" not in got  # other space: no asymmetric search
    export = task.export(tmp_path / "export")[0]
    st = SentenceTransformer(str(export), device="cpu")
    assert st.get_embedding_dimension() == 16
    texts = toy_data().doc_texts[:3]
    assert torch.allclose(torch.from_numpy(st.encode(texts)), student.encode(texts), atol=1e-5)
    assert not (export / "adapters.pt").exists()
    adapters = torch.load(task.export(tmp_path / "with", with_adapters=True)[1])
    assert adapters["embed.projection.weight"].shape == (32, 16)


def test_matryoshka_pipeline_smoke_run(toy, compose_run):
    """kdkit-train experiment=scifact_minilm_matryoshka on the toy data and tiny models (the toy
    teacher is 32 wide: dims 16 and 8 stand in for 256 / 128 / 64)."""
    folder, teacher_dir, cache = toy
    cfg, results = compose_run(
        "experiment=scifact_minilm_matryoshka", f"data.path={folder}", f"paths.cache_dir={cache}",
        f"teacher.model.name_or_path={teacher_dir}", "student.model.layers=[0,3]",
        "distiller.matryoshka.dims=[16,8]", "task.eval_dims=[16,8]", "trainer.log_every_n_steps=1",
        "data.batch_size=4", "data.eval_batch_size=8", "task.throughput_passages=8", "task.throughput_repeats=1")
    assert set(results) == {"teacher", "student"}
    for stage in ("teacher", "student"):
        assert {f"test/{m}@d{d}" for m in ("ndcg@10", "recall@100", "mrr@10") for d in (16, 8)} <= set(results[stage])
    assert "test/asym/ndcg@10" in results["student"]
    with open(f"{cfg.paths.output_dir}/logs/student/metrics.csv") as f:
        header = f.readline().strip().split(",")
    assert {"train/loss/embed", "train/loss/matryoshka/d16", "train/loss/matryoshka/d8"} <= set(header)
    assert json.loads(open(f"{cfg.paths.output_dir}/results.json").read()) == results
