"""Export fidelity: a retrieval run's exported student, loaded by sentence-transformers alone,
scores the test metrics the run reported (toy BEIR data, tiny BERTs)."""

import json
from pathlib import Path

import pytest
import torch

from kdkit.models.text import from_teacher_layers
from kdkit.retrieval_metrics import retrieval_metrics
from tests.tasks.test_retrieval import toy, toy_data  # noqa: F401  (toy: the module's fixture)


@pytest.fixture(scope="module")
def run_dir(toy, tmp_path_factory):  # noqa: F811
    """A whole ``kdkit-train experiment=scifact_minilm`` run on the toy data: the student stage
    trains a few steps, is tested on every test text, and is exported."""
    from kdkit.compose import compose
    from kdkit.pipeline import run

    from tests.conftest import SMOKE

    folder, teacher_dir, cache = toy
    out = tmp_path_factory.mktemp("export_run") / "run"
    torch.manual_seed(0)
    run(compose([*SMOKE, "experiment=scifact_minilm", f"data.path={folder}", f"paths.cache_dir={cache}",
                 f"teacher.model.name_or_path={teacher_dir}", "student.model.layers=[0,3]", "stages.teacher=false",
                 "data.batch_size=4", "data.eval_batch_size=8", "trainer.limit_train_batches=4",
                 "trainer.limit_test_batches=1.0",  # the whole test set, as a real run evaluates it
                 "task.optimizer.lr=1e-2",  # a few steps that visibly move the weights
                 "task.throughput_passages=8", "task.throughput_repeats=1"], output_dir=str(out)))
    return out


def test_sentence_transformers_reproduces_the_reported_test_metrics(run_dir, toy):  # noqa: F811
    from sentence_transformers import SentenceTransformer

    reported = json.loads((run_dir / "results.json").read_text())["student"]
    model = SentenceTransformer(str(run_dir / "export"), device="cpu")
    data = toy_data()
    test_ids = sorted(data.qrels["test"])
    queries = torch.from_numpy(model.encode([data.queries[q] for q in test_ids]))
    corpus = torch.from_numpy(model.encode(data.doc_texts))
    got = retrieval_metrics(queries, corpus, test_ids, data.doc_ids, data.qrels["test"])
    for name in ("ndcg@10", "recall@100", "mrr@10"):
        assert got[name] == pytest.approx(reported[f"test/{name}"], abs=1e-6), name
    assert 0 < reported["test/ndcg@10"] < 1
    # the export holds the trained student, not its initial slice of the teacher: the equality
    # above is about the weights the run trained and tested
    untrained = from_teacher_layers(str(toy[1]), layers=[0, 3]).encode(data.doc_texts)
    assert (corpus - untrained).abs().max() > 1e-3


def test_the_benchmark_check_agrees(run_dir):
    """``benchmarks/export_check.py`` (the same check for a real run folder) on this run."""
    from benchmarks.export_check import check_run

    checked = check_run(run_dir)
    assert set(checked) == {"ndcg@10", "recall@100", "mrr@10"}
    reported = json.loads((run_dir / "results.json").read_text())["student"]
    for name, r in checked.items():
        assert r["run"] == reported[f"test/{name}"] and r["diff"] <= 1e-6


def test_the_benchmark_check_refuses_a_folder_without_an_export(tmp_path):
    from benchmarks.export_check import check_run
    from kdkit.errors import KdkitError

    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(KdkitError, match="no config.yaml, export"):
        check_run(Path(tmp_path))
