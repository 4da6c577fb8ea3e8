"""RetrievalTask on toy BEIR data with tiny BERTs: evaluation, training paths, report, export."""

import json
from functools import partial

import lightning as L
import pytest
import torch

from kdkit.datamodules.beir import BEIRData, BEIRDataModule, write_beir
from kdkit.distillers.embed import Embed
from kdkit.distillers.listwise import Listwise
from kdkit.distillers.margin_mse import MarginMSE
from kdkit.errors import KdkitError
from kdkit.models.text import from_teacher_layers, hf_encoder, tokenizer_identity
from kdkit.optim import constant
from kdkit.retrieval_metrics import retrieval_metrics
from kdkit.tasks.retrieval import RetrievalTask, info_nce
from kdkit.tasks.retrieval_table import EmbeddingCache, build_teacher_table, teacher_source
from kdkit.teacher_source import PrecomputedTeacher

WORDS = "cell heart gene virus brain lung protein cancer blood bone liver skin".split()


def toy_data() -> BEIRData:
    """40 passages of 4 words; query i repeats 3 words of passage i (train 0-11, test 12-19)."""
    docs = [" ".join(WORDS[(i * k + k) % 12] for k in range(1, 5)) + f" number {i}" for i in range(40)]
    queries = {f"q{i}": " ".join(docs[i].split()[:3]) for i in range(20)}
    train = {f"q{i}": {f"d{i}": 1} for i in range(12)}
    test = {f"q{i}": {f"d{i}": 1, f"d{i + 20}": 1} for i in range(12, 20)}
    return BEIRData([f"d{i}" for i in range(40)], docs, queries, {"train": train, "test": test})


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(BEIR folder, tiny 4-layer teacher folder with sentence-transformers files, cache dir)."""
    root = tmp_path_factory.mktemp("retrieval")
    torch.manual_seed(0)
    config = dict(model_type="bert", vocab_size=30522, hidden_size=32, num_hidden_layers=4,
                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    hf_encoder(config=config, pretrained=False, max_length=32).save_pretrained(root / "teacher")
    return write_beir(toy_data(), root / "toy"), root / "teacher", root / "cache"


def datamodule(toy, **kwargs):
    folder, _, cache = toy
    kwargs = {"batch_size": 8, "eval_batch_size": 8, **kwargs}
    return BEIRDataModule(name="toy", path=str(folder), cache_dir=str(cache), **kwargs)


def models(toy):
    torch.manual_seed(0)
    teacher = from_teacher_layers(str(toy[1]), layers=[0, 1, 2, 3])  # the whole teacher
    student = from_teacher_layers(str(toy[1]), layers=[0, 3])
    return teacher, student


def trainer(**kwargs):
    kwargs.setdefault("devices", 1)
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def make_task(student, teacher=None, distillers=None, **kwargs):
    return RetrievalTask(student, teacher, distillers=distillers or {},
                         optimizer=partial(torch.optim.AdamW, lr=1e-3), scheduler=constant,
                         throughput_passages=8, throughput_batch_size=4, throughput_repeats=1, **kwargs)


@pytest.mark.parametrize("target_max_length", [None, 4])
def test_test_metrics_equal_a_direct_search(toy, target_max_length):
    teacher, student = models(toy)
    # short training targets must not shorten the asymmetric index: it is the teacher's own
    dm = datamodule(toy, target_max_length=target_max_length)
    task = make_task(student, teacher, {"embed": Embed()})
    got = trainer().test(task, datamodule=dm, verbose=False)[0]
    data = toy_data()
    test_ids = sorted(data.qrels["test"])
    queries = student.encode([data.queries[q] for q in test_ids])
    expected = retrieval_metrics(queries, student.encode(data.doc_texts), test_ids, data.doc_ids, data.qrels["test"])
    asym = retrieval_metrics(queries, teacher.encode(data.doc_texts), test_ids, data.doc_ids, data.qrels["test"])
    for name in ("ndcg@10", "recall@100", "mrr@10"):
        assert got[f"test/{name}"] == pytest.approx(expected[name], abs=1e-6)
        assert got[f"test/asym/{name}"] == pytest.approx(asym[name], abs=1e-6)
    assert 0 < got["test/ndcg@10"] < 1


def test_teacher_stage_caches_its_corpus_encoding(toy, monkeypatch):
    teacher, _ = models(toy)
    dm = datamodule(toy)
    first = trainer().test(make_task(teacher), datamodule=dm, verbose=False)[0]
    assert "test/asym/ndcg@10" not in first  # no teacher: symmetric figures only
    cached = EmbeddingCache(dm.static_pool().cache_dir).load(teacher, "corpus", teacher.max_length)
    assert cached is not None and torch.allclose(cached, teacher.encode(dm.data.doc_texts), atol=1e-5)
    # second evaluation: besides the 4-text probe forward, only the 8 queries are encoded
    rows = []
    forward = teacher.forward
    monkeypatch.setattr(teacher, "forward", lambda ids, mask: rows.append(len(ids)) or forward(ids, mask))
    again = trainer().test(make_task(teacher), datamodule=dm, verbose=False)[0]
    assert rows == [4, 8] and again == pytest.approx(first)


def test_embed_training_uses_the_teacher_table_and_lowers_the_loss(toy, monkeypatch):
    teacher, _ = models(toy)
    torch.manual_seed(1)  # a fresh random student: far from the teacher at the start
    student = hf_encoder(config=dict(model_type="bert", vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64),
                         pretrained=False, max_length=32)
    dm = datamodule(toy, stream="text")
    task = make_task(student, teacher, {"embed": Embed()})
    dm.setup("fit")
    dm.use_tokenizer(student.tokenizer, student.max_length)
    batch = dm.example_batch(n=16)

    def loss():
        with torch.no_grad():
            return task.losses(batch)[0]["embed"].item()

    table = build_teacher_table(teacher, dm.static_pool())  # what the task's setup installs
    task.teacher_sources["teacher"] = teacher_source("teacher", table.rows)
    before = loss()
    monkeypatch.setattr(teacher, "forward", lambda *a: pytest.fail("teacher ran during training"))
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer(max_steps=12).fit(task, datamodule=dm)
    assert loss() < 0.5 * before
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())
    assert "teacher" not in " ".join(task.state_dict())  # never in checkpoints


def test_the_training_step_reads_teacher_rows_from_the_precomputed_table(toy, monkeypatch):
    """With the table in place the teacher never runs: not in setup (cached), not in a training
    step; its outputs are the table rows at the batch's pool indices. A batch without pool
    indices falls back to one live forward."""
    teacher, student = models(toy)
    dm = datamodule(toy, stream="both", num_negatives=2, negative_ranks=(1, 6))
    dm.setup("fit")
    build_teacher_table(teacher, dm.static_pool())  # the on-disk cache, as an earlier stage leaves it
    calls = []
    forward = teacher.forward
    monkeypatch.setattr(teacher, "forward", lambda ids, mask: calls.append(len(ids)) or forward(ids, mask))
    task = make_task(student, teacher, {"embed": Embed(), "margin_mse": MarginMSE()})
    steps = []
    losses = task.losses
    monkeypatch.setattr(task, "losses", lambda batch: steps.append(1) or losses(batch))
    trainer(max_steps=3).fit(task, datamodule=dm)
    assert len(steps) == 3 and calls == []  # three training steps, no teacher forward
    source = task.teacher_sources["teacher"]
    assert isinstance(source, PrecomputedTeacher)
    batch = dm.example_batch(n=3)
    out = task.teacher_outputs(batch)
    assert calls == []
    torch.testing.assert_close(out.features["text"], teacher.encode([dm.pool_texts[i] for i in batch["text_pool"]]),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(out.features["passage"].reshape(9, -1), source.table[batch["passage_pool"]].cpu())
    torch.testing.assert_close(out.features["query"], source.table[batch["query_pool"]].cpu())
    calls.clear()  # (teacher.encode above ran it, outside the task)
    no_rows = {k: v for k, v in batch.items() if not k.endswith("_pool")}
    task.teacher_outputs(no_rows)  # same tokenizer: the live teacher answers
    assert calls == [3, 3, 9]  # texts, queries, passages


def test_tuple_distillers_train_and_log_named_terms(toy):
    teacher, student = models(toy)
    dm = datamodule(toy, stream="both", num_negatives=2, negative_ranks=(1, 6))
    task = make_task(student, teacher, {"embed": Embed(), "margin_mse": MarginMSE(weight=10.0),
                                        "listwise": Listwise()})
    t = trainer(max_steps=2, log_every_n_steps=1)
    t.fit(task, datamodule=dm)
    logged = t.callback_metrics
    assert {"train/loss/embed", "train/loss/margin_mse", "train/loss/listwise"} <= set(logged)
    total = sum(logged[f"train/loss/{k}"] for k in ("embed", "margin_mse", "listwise"))
    assert logged["train/loss"].item() == pytest.approx(total.item(), rel=1e-5)


def test_baseline_task_loss_is_info_nce(toy):
    _, student = models(toy)
    dm = datamodule(toy, stream="tuples", num_negatives=2)
    task = make_task(student)  # no distillers: the contrastive loss is the whole loss
    assert task.task_loss_weight == 1.0
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(3, 2, 4, generator=g), dim=-1)
    flat = p.reshape(6, 4)
    by_hand = sum(-(q[i] @ flat[2 * i] / 0.05) + torch.logsumexp(q[i] @ flat.T / 0.05, 0) for i in range(3)) / 3
    assert info_nce(q, p, 0.05).item() == pytest.approx(by_hand.item(), rel=1e-5)
    trainer(max_steps=2).fit(task, datamodule=dm)
    text_only = make_task(from_teacher_layers(str(toy[1]), layers=[0]))
    with pytest.raises(KdkitError, match="stream=tuples or both"):
        trainer(max_steps=1).fit(text_only, datamodule=datamodule(toy, stream="text"))


def test_inference_report_and_export(toy, tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    teacher, student = models(toy)
    dm = datamodule(toy)
    task = make_task(student, teacher, {"embed": Embed()})
    trainer().test(task, datamodule=dm, verbose=False)
    report = task.inference_report(dm.example_batch())
    assert report["layers"] == 2 and report["dim"] == 32 and report["max_length"] == 32
    assert report["params"] == sum(p.numel() for p in student.parameters()) < report["teacher_params"]
    assert report["speedup"] == pytest.approx(report["passages_per_s"] / report["teacher_passages_per_s"])
    paths = task.export(tmp_path / "export", with_adapters=False)
    assert paths == [tmp_path / "export"]
    texts = toy_data().doc_texts[:5]
    st = SentenceTransformer(str(paths[0]), device="cpu")
    assert torch.allclose(torch.from_numpy(st.encode(texts)), student.encode(texts), atol=1e-5)
    auto = AutoModel.from_pretrained(paths[0])
    assert auto.config.num_hidden_layers == 2
    assert json.loads((paths[0] / "sentence_bert_config.json").read_text())["max_seq_length"] == 32


@pytest.mark.parametrize("experiment", ["scifact_minilm", "scifact_minilm_sentences"])
def test_pipeline_smoke_run(toy, compose_run, experiment):
    """kdkit-train experiment=<experiment> on the toy data and tiny models (smoke overrides)."""
    folder, teacher_dir, cache = toy
    cfg, results = compose_run(
        f"experiment={experiment}", f"data.path={folder}", f"paths.cache_dir={cache}",
        f"teacher.model.name_or_path={teacher_dir}", "student.model.layers=[0,3]",
        "data.batch_size=4", "data.eval_batch_size=8", "task.throughput_passages=8", "task.throughput_repeats=1")
    assert set(results) == {"teacher", "student"}
    for stage in ("teacher", "student"):
        assert {"test/ndcg@10", "test/recall@100", "test/mrr@10", "passages_per_s"} <= set(results[stage])
    assert {"test/asym/ndcg@10", "speedup", "teacher_passages_per_s"} <= set(results["student"])
    out = cfg.paths.output_dir
    assert json.loads(open(f"{out}/results.json").read()) == results
    assert json.loads(open(f"{out}/stages/student.json").read()) == results["student"]
    from sentence_transformers import SentenceTransformer

    assert SentenceTransformer(f"{out}/export", device="cpu").get_embedding_dimension() == 32


@pytest.mark.slow
def test_teacher_reproduces_its_scifact_score(data_dir, tmp_path):
    """all-MiniLM-L6-v2 on SciFact test: nDCG@10 0.645 (MTEB). ~10 CPU minutes."""
    from kdkit.models.text import sentence_encoder

    dm = BEIRDataModule(name="scifact", data_dir=str(data_dir), cache_dir=str(tmp_path))
    got = trainer().test(make_task(sentence_encoder()), datamodule=dm, verbose=False)[0]
    assert got["test/ndcg@10"] == pytest.approx(0.645, abs=0.005)


def test_configs_compose_and_build():
    """conf/teacher/minilm.yaml resolves the bundled all-MiniLM-L6-v2; both student configs build."""
    from hydra.utils import instantiate

    from kdkit.compose import compose
    from kdkit.models.text_source import resolve_name_or_path

    cfg = compose(["experiment=scifact_minilm"])
    assert cfg.teacher.pretrained and cfg.data.stream == "text" and list(cfg.distiller) == ["embed"]
    teacher = instantiate(cfg.teacher.model)
    assert (teacher.num_layers, teacher.max_length, teacher.pooling, teacher.normalize) == (6, 256, "mean", True)
    assert teacher.tokenizer.name_or_path == resolve_name_or_path(None)
    student = instantiate(cfg.student.model)
    assert student.num_layers == 2 and student.max_length == 256
    hf = instantiate(compose(["experiment=scifact_minilm", "student=hf"]).student.model)
    assert (hf.num_layers, hf.dim, hf.normalize) == (2, 384, True)
    assert tokenizer_identity(hf.tokenizer) == tokenizer_identity(teacher.tokenizer)


@pytest.mark.slow
@pytest.mark.ddp
def test_sharded_evaluation_on_two_ranks_equals_one_process(toy):
    """Under DDP each rank encodes a shard of the corpus and queries; the gathered metrics equal
    the single-process ones (gloo on CPU, ddp_spawn)."""
    teacher, student = models(toy)
    single = trainer().test(make_task(student, teacher, {"embed": Embed()}), datamodule=datamodule(toy),
                            verbose=False)[0]
    ddp = trainer(strategy="ddp_spawn", devices=2).test(make_task(student, teacher, {"embed": Embed()}),
                                                        datamodule=datamodule(toy), verbose=False)[0]
    assert ddp == pytest.approx(single, abs=1e-6)
