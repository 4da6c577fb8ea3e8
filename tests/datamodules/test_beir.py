"""BEIR datamodule: reading, zip extraction, streams, the static pool, negatives handed over,
eval layout; and the retrieval task's teacher table built over its pool (the datamodule itself
never runs a model)."""

import inspect
import zipfile

import pytest
import torch

from kdkit.datamodules.beir import (BEIRData, BEIRDataModule, Collate, EvalStream, locate, read_beir,
                                    sample_sentences, split_sentences, write_beir)
from kdkit.errors import KdkitError
from kdkit.models.text import TextEncoder, hf_encoder
from kdkit.tasks.retrieval_table import build_teacher_table, mine_negatives, static_embeddings
from tests.datamodules.fault_helpers import needs_non_root, one_line, truncate

WORDS = "cell heart gene virus brain lung protein cancer blood bone".split()


def toy_data() -> BEIRData:
    """30 passages of 3 words; query i is the words of passage i (train: 0-7, test: 8-11)."""
    docs = [" ".join(WORDS[(i + k * (1 + i // 10)) % 10] for k in range(3)) + f" {i}" for i in range(30)]
    queries = {f"q{i}": docs[i].rsplit(" ", 1)[0] for i in range(12)}
    train = {f"q{i}": {f"d{i}": 1, f"d{i + 12}": 1 if i < 2 else 0} for i in range(8)}
    test = {f"q{i}": {f"d{i}": 1} for i in range(8, 12)}
    return BEIRData([f"d{i}" for i in range(30)], docs, queries, {"train": train, "test": test})


def tiny_encoder(seed=0):
    torch.manual_seed(seed)
    config = dict(model_type="bert", vocab_size=30522, hidden_size=16, num_hidden_layers=2,
                  num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    return hf_encoder(config=config, pretrained=False, max_length=24)


@pytest.fixture
def toy_dir(tmp_path):
    return write_beir(toy_data(), tmp_path / "toy", titles={"d0": "Title"})


def module(toy_dir, tmp_path, **kwargs):
    dm = BEIRDataModule(name=None, path=str(toy_dir), cache_dir=str(tmp_path / "cache"), batch_size=4,
                        eval_batch_size=4, **kwargs)
    dm.setup("fit")
    return dm


def bind(dm, student, teacher=None):
    """What ``RetrievalTask.setup`` does: the student's tokenizer to the datamodule; the teacher's
    table built over the datamodule's pool, its mined negatives handed back as data."""
    dm.use_tokenizer(student.tokenizer, student.max_length)
    table = build_teacher_table(teacher, dm.static_pool()) if teacher is not None else None
    dm.use_negatives(table.negatives if table is not None else None)
    return table


def test_read_write_roundtrip(toy_dir):
    data = read_beir(toy_dir)
    toy = toy_data()
    assert data.doc_ids == toy.doc_ids and data.queries == toy.queries and data.qrels == toy.qrels
    assert data.doc_texts[0] == "Title " + toy.doc_texts[0] and data.doc_texts[1:] == toy.doc_texts[1:]


def test_zip_is_extracted_once_and_located_from_the_data_dir(tmp_path, toy_dir):
    beir = tmp_path / "data" / "beir"
    beir.mkdir(parents=True)
    with zipfile.ZipFile(beir / "toy.zip", "w") as zf:  # BEIR zips nest one folder
        for f in toy_dir.rglob("*"):
            if f.is_file():
                zf.write(f, f"toy/{f.relative_to(toy_dir)}")
    cache = tmp_path / "cache"
    folder = locate("toy", None, str(tmp_path / "data"), str(cache))
    assert folder == cache / "beir" / "toy" / "toy" and read_beir(folder).doc_ids == toy_data().doc_ids
    stamp = (folder / "corpus.jsonl").stat().st_mtime_ns
    assert locate(None, str(beir / "toy.zip"), None, str(cache)) == folder
    assert (folder / "corpus.jsonl").stat().st_mtime_ns == stamp  # not extracted again
    with pytest.raises(KdkitError, match="KDKIT_DATA_DIR.*download=true"):
        locate("nfcorpus", None, str(tmp_path / "data"), str(cache))
    # download=true fetches BEIR's zip (a file:// URL stands in for the server here)
    url = f"file://{beir}/{{name}}.zip"
    got = locate("toy", None, None, str(tmp_path / "dl"), download=True, url=url)
    assert read_beir(got).qrels == toy_data().qrels


def test_real_scifact_counts_and_no_test_query_in_training(data_dir, tmp_path):
    dm = BEIRDataModule(name="scifact", data_dir=str(data_dir), cache_dir=str(tmp_path), stream="both")
    dm.setup("fit")
    assert dm.num_docs == 5183 and len(dm.data.queries) == 1109
    assert sum(len(v) for v in dm.data.qrels["train"].values()) == 919 and len(dm.train_query_ids) == 809
    assert sum(len(v) for v in dm.data.qrels["test"].values()) == 339 and len(dm.test_ids) == 300
    assert not set(dm.train_query_ids) & set(dm.test_ids)
    assert dm.pool_texts[dm.num_docs:] == [dm.data.queries[q] for q in dm.train_query_ids]
    # SciFact itself repeats 2 claims verbatim in train and test (different ids): train data.
    test_texts = {dm.data.queries[q] for q in dm.test_ids}
    assert len(test_texts & set(dm.pool_texts[dm.num_docs:])) == 2
    assert len(dm.train_pairs) == 919 and len(dm.train_set) == 5183 + 809


def test_mine_negatives_skips_positives_and_top_ranks():
    docs = torch.eye(6)
    query = torch.tensor([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])  # ranking d0 > d1 > ... > d5
    assert mine_negatives(query, docs, [{1}], ranks=(0, 3)) == [[0, 2, 3]]
    assert mine_negatives(query, docs, [{0, 2}], ranks=(1, 3)) == [[3, 4]]
    with pytest.raises(KdkitError, match="lo < hi"):
        mine_negatives(query, docs, [set()], ranks=(3, 3))


def test_the_teacher_table_negatives_and_cache(toy_dir, tmp_path, monkeypatch):
    dm = module(toy_dir, tmp_path, stream="tuples", num_negatives=2, negative_ranks=(0, 4), val_queries=2)
    teacher, student = tiny_encoder(0), tiny_encoder(1)
    table = bind(dm, student, teacher)
    assert len(dm.val_ids) == 2 and not set(dm.val_ids) & set(dm.train_query_ids)
    expected = teacher.encode(dm.pool_texts)
    assert torch.allclose(table.rows, expected, atol=1e-5)
    assert len(table.rows) == 30 + 6 and dm.eval_max_length == student.max_length
    # mined from the teacher's ranking: never a positive, at most hi - lo candidates
    corpus, queries = expected[:30], expected[30:]
    assert dm.negatives == table.negatives == mine_negatives(queries, corpus, dm.train_positives, (0, 4))
    # second build reads the cache: the teacher does not encode again
    monkeypatch.setattr(type(teacher), "encode", lambda *a, **k: pytest.fail("encoded twice"))
    table = bind(dm, student, teacher)
    assert torch.allclose(table.rows, expected, atol=1e-6)
    batch = dm.example_batch(n=3)
    assert batch["passage_input_ids"].shape[0] == 3 * 3 and batch["query_input_ids"].shape[0] == 3
    pool = batch["passage_pool"].view(3, 3)
    for i in range(3):
        q, pos = dm.train_pairs[i]
        assert batch["query_pool"][i] == 30 + q and pool[i, 0] == pos
        assert set(pool[i, 1:].tolist()) <= set(dm.negatives[q]) and pos not in pool[i, 1:].tolist()
    texts = dm.tokenizer.batch_decode(batch["query_input_ids"], skip_special_tokens=True)
    assert texts == [dm.pool_texts[p] for p in batch["query_pool"].tolist()]


def test_the_datamodule_never_runs_a_model(toy_dir, tmp_path, monkeypatch):
    """Its API takes no model, and a whole round of data (setup, the pool, negatives handed over
    as index tensors, every loader, the example batch) runs with every model call refused."""
    for name, member in inspect.getmembers(BEIRDataModule, inspect.isfunction):
        taken = set(inspect.signature(member).parameters) & {"model", "student", "teacher", "encoder"}
        assert not taken, f"BEIRDataModule.{name} takes {taken}"
    tokenizer = tiny_encoder(1).tokenizer

    def refuse(*args, **kwargs):
        pytest.fail("the datamodule ran a model")

    monkeypatch.setattr(torch.nn.Module, "__call__", refuse)
    for method in ("encode", "forward", "fingerprint"):
        monkeypatch.setattr(TextEncoder, method, refuse)
    for stream in ("text", "tuples", "both"):
        dm = module(toy_dir, tmp_path, stream=stream, num_negatives=2, val_queries=1)
        dm.use_tokenizer(tokenizer, 16)
        pool = dm.static_pool()
        assert [t for texts in pool.texts.values() for t in texts] == dm.pool_texts
        assert pool.negative_ranks == (None if stream == "text" else (3, 30))
        negatives = [torch.tensor([d for d in range(30) if d not in pos][-3:]) for pos in dm.train_positives]
        dm.use_negatives(negatives)
        batches = [*dm.train_dataloader(), *dm.val_dataloader(), *dm.test_dataloader(), dm.example_batch()]
        assert all(b["text_input_ids" if "text_input_ids" in b else "query_input_ids"].shape[0] for b in batches)
        if stream != "text":  # the tuples' negatives come from the rows handed over
            for b in dm.train_dataloader():
                groups = b["passage_pool"].view(-1, 3)
                for q, group in zip(b["query_pool"].tolist(), groups):
                    assert set(group[1:].tolist()) <= set(negatives[q - 30].tolist())
        dm.eval_layout("test"), dm.passage_texts(3)


def test_handed_over_negatives_are_checked(toy_dir, tmp_path):
    dm = module(toy_dir, tmp_path, stream="tuples")
    ok = [[d for d in range(30) if d not in pos][:5] for pos in dm.train_positives]
    dm.use_negatives(ok)
    assert dm.negatives == ok
    with pytest.raises(KdkitError, match="7 rows of negatives for 8 train queries"):
        dm.use_negatives(ok[:-1])
    with pytest.raises(KdkitError, match="30 is not a corpus row"):
        dm.use_negatives([[30]] + ok[1:])
    with pytest.raises(KdkitError, match="train query 0 include its positive passage 0"):
        dm.use_negatives([[0, 5]] + ok[1:])
    dm.use_negatives(None)  # back to random non-positive passages
    assert dm.negatives is None and all(len(c) == 27 for c in dm._candidates())


def test_the_table_equals_the_teacher_encoding_each_text_alone(toy_dir, tmp_path):
    dm = module(toy_dir, tmp_path, stream="both", corpus_sentences=1, teacher_batch_size=5)
    teacher = tiny_encoder(0)
    table = build_teacher_table(teacher, dm.static_pool())
    alone = torch.cat([teacher.encode([text]) for text in dm.pool_texts])
    assert table.rows.shape == alone.shape == (len(dm.pool_texts), 16)
    torch.testing.assert_close(table.rows, alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(table.index, alone[:30], atol=1e-6, rtol=0)


@pytest.mark.parametrize("ranks", [(0, 4), (3, 9)])
def test_the_negatives_are_the_teacher_ranking(toy_dir, tmp_path, ranks):
    dm = module(toy_dir, tmp_path, stream="tuples", negative_ranks=ranks, num_negatives=2)
    teacher = tiny_encoder(0)
    bind(dm, tiny_encoder(1), teacher)
    corpus, queries = teacher.encode(dm.data.doc_texts), teacher.encode(dm.train_query_texts)
    for q, pos in enumerate(dm.train_positives):  # by hand: sort every passage by score
        ranking = sorted(range(30), key=lambda d: -float(queries[q] @ corpus[d]))
        assert dm.negatives[q] == [d for d in ranking if d not in pos][ranks[0]:ranks[1]]


def test_held_out_queries_change_the_cache_key_of_the_train_queries(toy_dir, tmp_path):
    """The train-query set depends on the validation hold-out (count and seed): each has its own
    cache file, so a run never reads another hold-out's query embeddings."""
    teacher, student = tiny_encoder(0), tiny_encoder(1)
    for val_queries, seed in ((2, 0), (0, 0), (2, 1)):
        dm = module(toy_dir, tmp_path, val_queries=val_queries, seed=seed)
        table = bind(dm, student, teacher)
        torch.testing.assert_close(table.rows, teacher.encode(dm.pool_texts), atol=1e-5, rtol=0)
    names = sorted(p.name.rsplit("-", 2)[0] for p in (tmp_path / "cache" / "retrieval").rglob("queries-*.pt"))
    assert names == ["queries-train", "queries-train-heldout2-seed0", "queries-train-heldout2-seed1"]


def test_target_max_length_truncates_the_teacher_targets_only(toy_dir, tmp_path):
    dm = module(toy_dir, tmp_path, target_max_length=4)  # [CLS] + 2 word pieces + [SEP]
    teacher = tiny_encoder(0)
    table = bind(dm, tiny_encoder(1), teacher)
    short = teacher.encode(dm.pool_texts, max_length=4)
    assert torch.allclose(table.rows, short, atol=1e-5)
    assert not torch.allclose(short, teacher.encode(dm.pool_texts), atol=1e-3)  # truncation bites
    # the evaluation index (asymmetric mode) keeps the teacher's own length
    torch.testing.assert_close(table.index, teacher.encode(dm.data.doc_texts), atol=1e-5, rtol=0)
    # scripts read the same cache files
    assert torch.equal(static_embeddings(dm, teacher, "corpus"), table.index)
    assert torch.equal(static_embeddings(dm, teacher, "corpus", 4), table.rows[:30])


def test_text_and_both_streams(toy_dir, tmp_path):
    dm = module(toy_dir, tmp_path, stream="both", include_queries=True)
    bind(dm, tiny_encoder(1))  # no teacher: random non-positive negatives
    assert len(dm.train_set) == 30 + 8
    item = dm.train_set[33]
    assert item["text"] == dm.pool_texts[33] and item["index"] == item["text_pool"] == 33
    assert item["tuple_index"] == 33 % len(dm.train_pairs)
    q, pos = dm.train_pairs[item["tuple_index"]]
    assert item["passage_pool"][0] == pos and not set(item["passage_pool"][1:]) & dm.train_positives[q]
    batch = next(iter(dm.train_dataloader()))
    assert {"text_input_ids", "query_input_ids", "passage_input_ids", "index", "tuple_index"} <= set(batch)
    assert batch["text_input_ids"].shape[1] <= dm.max_length and batch["index"].dtype == torch.long
    with pytest.raises(KdkitError, match="stream"):
        BEIRDataModule(stream="pairs")


def test_eval_stream_covers_everything_once_in_homogeneous_batches():
    stream = EvalStream([f"doc {i} " + "x " * i for i in range(23)], [f"q{i}" for i in range(9)], 4)
    assert sorted(stream.order) == list(range(32))
    batches = [stream.order[i:i + 4] for i in range(0, 32, 4)]
    assert all(j >= 23 for j in batches[0])  # a query batch first: cut-short runs still see queries
    kinds = [{j >= 23 for j in b} for b in batches[:-2]]
    assert all(len(k) == 1 for k in kinds)  # one kind per batch except the tail
    item = stream[0]
    assert item["is_query"] and item["text"] == stream.texts[item["index"]]
    collated = Collate(tiny_encoder().tokenizer, 8)([stream[i] for i in range(4)])
    assert collated["is_query"].dtype == torch.bool and collated["text_input_ids"].shape[0] == 4


def test_eval_layout(toy_dir, tmp_path):
    dm = module(toy_dir, tmp_path, val_queries=3)
    docs, queries, qrels = dm.eval_layout("test")
    assert docs == toy_data().doc_ids and queries == ["q10", "q11", "q8", "q9"]
    assert qrels == toy_data().qrels["test"]
    docs, queries, qrels = dm.eval_layout("val")
    assert queries == dm.val_ids and set(qrels) == set(dm.val_ids)


def test_split_and_sample_sentences():
    text = "Title words here. First claim has five words. Short one. (Second) claim has five words! 3 x."
    # "Title words here." and "Short one." are too short; "3 x." too
    assert split_sentences(text) == ["First claim has five words.", "(Second) claim has five words!"]
    assert split_sentences("p < 0.05 was seen in all the treated mice") == ["p < 0.05 was seen in all the treated mice"]
    passages = [text, "only one sentence in this passage", "A b c d e. F g h i j. K l m n o."]
    drawn, source = sample_sentences(passages, 2, seed=0)
    assert (drawn, source) == sample_sentences(passages, 2, seed=0) and source == [0, 0, 2, 2]
    assert set(drawn[:2]) == set(split_sentences(text)) and set(drawn[2:]) < set(split_sentences(passages[2]))
    assert drawn[2:] == sorted(drawn[2:], key=passages[2].index)  # corpus order kept
    assert sample_sentences(passages, 5, seed=1)[0][2:] == split_sentences(passages[2])


def test_corpus_sentences_join_the_text_stream_with_their_own_targets(tmp_path):
    data = toy_data()
    data.doc_texts[3] = "Stem cells repair the heart. Vitamin D lowers fracture risk in women."
    data.doc_texts[5] = "Gene therapy cures the disease. Virus load drops after the treatment."
    folder = write_beir(data, tmp_path / "toy")
    dm = module(folder, tmp_path, corpus_sentences=1, include_queries=False)
    assert len(dm.sentences) == 2 and dm.sentences[0] in data.doc_texts[3] and dm.sentences[1] in data.doc_texts[5]
    teacher = tiny_encoder(0)
    table = bind(dm, tiny_encoder(1), teacher)
    assert len(table.rows) == 30 + 8 + 2  # corpus, train queries, sentences
    torch.testing.assert_close(table.rows[-2:], teacher.encode(dm.sentences), atol=1e-5, rtol=0)
    # queries left out of the stream: the sentences still find their own rows of the table
    stream = dm.train_set
    assert len(stream) == 30 + 2
    for i, sentence in ((30, dm.sentences[0]), (31, dm.sentences[1])):
        assert stream[i]["text"] == sentence and stream[i]["text_pool"] == 38 + i - 30
        assert dm.pool_texts[stream[i]["text_pool"]] == sentence
    with pytest.raises(KdkitError, match="corpus_sentences"):
        module(folder, tmp_path, corpus_sentences=-1)
    with pytest.raises(KdkitError, match="sentence_target"):
        module(folder, tmp_path, corpus_sentences=1, sentence_target="doc")


def test_sentences_can_take_their_passage_embedding_as_target(tmp_path):
    data = toy_data()
    data.doc_texts[3] = "Stem cells repair the heart. Vitamin D lowers fracture risk in women."
    folder = write_beir(data, tmp_path / "toy")
    dm = module(folder, tmp_path, corpus_sentences=1, sentence_target="passage")
    teacher = tiny_encoder(0)
    table = bind(dm, tiny_encoder(1), teacher)
    assert len(table.rows) == 30 + 8  # no rows of their own
    item = dm.train_set[30 + 8]  # after the passages and the train queries
    assert item["text"] == dm.sentences[0] and item["text"] in data.doc_texts[3]
    assert item["text_pool"] == 3  # the row of the passage it was cut from
    torch.testing.assert_close(table.rows[3], teacher.encode([data.doc_texts[3]])[0], atol=1e-5, rtol=0)


def test_group_by_length_batches_the_text_stream_by_token_count(toy_dir, tmp_path):
    with pytest.raises(KdkitError, match="group_by_length"):
        module(toy_dir, tmp_path, stream="tuples", group_by_length=True)
    grouped, plain = (module(toy_dir, tmp_path, group_by_length=g) for g in (True, False))
    for dm in (grouped, plain):
        bind(dm, tiny_encoder(1))

    def epoch(dm):
        batches = list(dm.train_dataloader())
        padding = sum(int((b["text_attention_mask"] == 0).sum()) for b in batches)
        return [i for b in batches for i in b["index"].tolist()], padding

    seen, padding = epoch(grouped)
    assert len(seen) == len(set(seen)) == len(grouped.train_set) // 4 * 4  # each sample once, drop_last
    assert padding < epoch(plain)[1]  # queries (3 words) no longer padded to the passages' 4-5


# ---- damaged files: one line naming the file (and line) and saying what to do -------------------
def _zip_folder(folder, archive):
    with zipfile.ZipFile(archive, "w") as zf:
        for f in folder.rglob("*"):
            if f.is_file():
                zf.write(f, f"{folder.name}/{f.relative_to(folder)}")
    return archive


@pytest.mark.parametrize("name, what", [("corpus.jsonl", "BEIR corpus"), ("queries.jsonl", "BEIR queries")])
@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_an_empty_jsonl_file(toy_dir, name, what, content):
    (toy_dir / name).write_text(content)
    with pytest.raises(KdkitError) as err:
        read_beir(toy_dir)
    one_line(err, f"{what} {toy_dir / name} is unreadable (empty file", "re-download the dataset")


def test_a_bad_json_line_is_named_with_its_number(toy_dir):
    path = toy_dir / "corpus.jsonl"
    lines = path.read_text().splitlines()
    lines[6] = lines[6][:-5]  # cut short: the closing quote and brace are gone
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(KdkitError) as err:
        read_beir(toy_dir)
    assert "not valid JSON" in one_line(err, f"{path} line 7", "BEIR corpus", "re-download the dataset")


@pytest.mark.parametrize("name, line, reason", [
    ("corpus.jsonl", '{"title": "no id", "text": "x"}', 'not a JSON object with an "_id"'),
    ("corpus.jsonl", '["_id", "a list"]', 'not a JSON object with an "_id"'),
    ("corpus.jsonl", '{"_id": "d99", "text": 42}', '"text" is not a string'),
    ("queries.jsonl", '{"_id": "q99"}', '"text" is missing'),
])
def test_a_line_of_the_wrong_shape(toy_dir, name, line, reason):
    path = toy_dir / name
    n = len(path.read_text().splitlines())
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(KdkitError) as err:
        read_beir(toy_dir)
    assert reason in one_line(err, f"{path} line {n + 1}", "fix the file or re-download the dataset")


def test_a_corpus_that_is_not_text(toy_dir):
    path = toy_dir / "corpus.jsonl"
    path.write_bytes(path.read_bytes()[:300] + bytes(range(128, 256)) * 4)
    with pytest.raises(KdkitError) as err:
        read_beir(toy_dir)
    assert "UnicodeDecodeError" in one_line(err, path, "it is not UTF-8 text")


def test_a_directory_where_the_corpus_belongs(toy_dir):
    path = toy_dir / "corpus.jsonl"
    path.unlink()
    path.mkdir()
    with pytest.raises(KdkitError) as err:
        read_beir(toy_dir)
    one_line(err, path, "IsADirectoryError", "it is a directory")


@needs_non_root
def test_an_unreadable_queries_file(toy_dir):
    (toy_dir / "queries.jsonl").chmod(0)
    with pytest.raises(KdkitError) as err:
        read_beir(toy_dir)
    one_line(err, toy_dir / "queries.jsonl", "check its permissions")


@pytest.mark.parametrize("content, where, reason", [
    ("", "", "empty file"),
    ("query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td1\tmaybe\n", " line 3", "score 'maybe' is not a whole number"),
    ("query-id\tcorpus-id\tscore\nq0\td0\t1\n\nq1 d1 1\n", " line 4", "1 tab-separated fields, not 3"),
    ("query-id\tcorpus-id\tscore\nq0\td0\t1\n".encode() + bytes(range(128, 256)), "", "not UTF-8 text"),
])
def test_a_bad_qrels_file(toy_dir, content, where, reason):
    path = toy_dir / "qrels" / "train.tsv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(KdkitError) as err:
        read_beir(toy_dir)
    assert reason in one_line(err, f"{path}{where}", "BEIR qrels", "re-download the dataset")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_damaged_zip_is_named(toy_dir, tmp_path, damage):
    archive = _zip_folder(toy_dir, tmp_path / "toy.zip")
    if damage == "truncate":
        truncate(archive, 0.6)
    else:
        archive.write_bytes(b"" if damage == "empty" else b"PK not really a zip" * 30)
    with pytest.raises(KdkitError) as err:
        locate(None, str(archive), None, str(tmp_path / "cache"))
    one_line(err, f"BEIR zip {archive}", "corrupt or truncated: re-download or replace it")
    assert not (tmp_path / "cache" / "beir" / "toy").exists()  # nothing half-extracted is used


def test_a_warm_download_cache_warns_about_the_data_dir(toy_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    (cache / "beir").mkdir(parents=True)
    _zip_folder(toy_dir, cache / "beir" / "toy.zip")  # downloaded by an earlier run
    empty = tmp_path / "empty-data-dir"
    (empty / "beir").mkdir(parents=True)
    for _ in range(2):  # prepare_data, then setup
        folder = locate("toy", None, str(empty), str(cache), download=True, url="file:///nowhere/{name}.zip")
    assert read_beir(folder).doc_ids == toy_data().doc_ids
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1, warnings
    assert str(empty / "beir" / "toy.zip") in warnings[0] and str(cache / "beir" / "toy.zip") in warnings[0]


def test_a_damaged_embedding_cache_is_named(toy_dir, tmp_path):
    dm = module(toy_dir, tmp_path)
    teacher = tiny_encoder(0)
    build_teacher_table(teacher, dm.static_pool())
    (path,) = (tmp_path / "cache" / "retrieval").rglob("corpus-*.pt")
    truncate(path)
    with pytest.raises(KdkitError) as err:
        build_teacher_table(teacher, dm.static_pool())
    one_line(err, path, "cached teacher embeddings", "delete it")


@pytest.mark.parametrize("option, value", [("batch_size", 0), ("eval_batch_size", 0),
                                           ("teacher_batch_size", 0), ("num_workers", -2)])
def test_bad_loader_options_are_refused(option, value):
    with pytest.raises(KdkitError) as err:
        BEIRDataModule(**{option: value})
    one_line(err, f"data.{option}={value} must be a whole number >=")
