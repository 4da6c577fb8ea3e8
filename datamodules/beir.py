"""BEIR-format retrieval data: a corpus, queries and qrels; training streams and an eval stream.

BEIR format (Thakur et al. 2021): ``corpus.jsonl`` (``_id``, ``title``, ``text``),
``queries.jsonl`` (``_id``, ``text``), ``qrels/<split>.tsv`` (``query-id  corpus-id  score``,
header line). Read from a folder, or from the zip BEIR distributes (extracted once into the cache).

Streams (``stream``):

- ``text``: unlabeled text, one text per sample: every corpus passage and every *train* query
  (embedding distillation, LEAF), plus ``corpus_sentences`` sentences cut from each passage:
  short, query-like texts (a query is one claim or question; a passage is a whole abstract),
  whose target is the teacher's embedding of the sentence or of its passage (``sentence_target``).
- ``tuples``: ``(query, positive, negatives)`` from the train qrels; the negatives are drawn,
  fresh every epoch, from the teacher's top-ranked non-positive passages (mined once at bind).
- ``both``: sample i is text i plus tuple ``i mod #tuples``.

Test (and validation) batches are the texts to encode: every corpus passage, then the split's
queries. Test queries and test qrels are never part of a training stream.

Teacher embeddings of every static training text (corpus passages, train queries) are computed
once when the task binds its models, cached on disk by the teacher's weight fingerprint, and
looked up by the ``*_pool`` indices every batch carries, so training never runs the teacher.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import pickle
import re
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kdkit.data_contract import RetrievalData
from kdkit.datamodules.archives import file_error, warn_cached
from kdkit.datamodules.base import check_loader_options
from kdkit.datamodules.length_grouping import LengthGroupedBatchSampler
from kdkit.distributed import FixedShardSampler, world
from kdkit.errors import KdkitError, unreadable
from kdkit.sampling import EpochShuffleSampler

STREAMS = ("text", "tuples", "both")
SENTENCE_TARGETS = ("sentence", "passage")
BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"


# ---- reading ----------------------------------------------------------------------------------
@dataclass
class BEIRData:
    """A BEIR dataset in memory.

    Args:
        doc_ids, doc_texts: corpus, in file order; a text is ``title + " " + text`` stripped (as
            BEIR's and MTEB's sentence-transformers evaluation build it).
        queries: query id -> text.
        qrels: split -> query id -> doc id -> relevance.
    """

    doc_ids: list[str]
    doc_texts: list[str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)

    def fingerprint(self) -> str:
        digest = hashlib.sha1()
        for did, text in zip(self.doc_ids, self.doc_texts):
            digest.update(f"{did}\t{text}\n".encode())
        for qid, text in self.queries.items():
            digest.update(f"{qid}\t{text}\n".encode())
        digest.update(json.dumps(self.qrels, sort_keys=True).encode())
        return digest.hexdigest()

    def split_qrels(self, split: str) -> dict[str, dict[str, int]]:
        if split not in self.qrels:
            raise KdkitError(f"qrels split {split!r} not found; this dataset has: {', '.join(sorted(self.qrels))}")
        return self.qrels[split]


BEIR_HINT = "fix the file or re-download the dataset"
EMPTY_HINT = "re-download the dataset, or point data.path at a complete BEIR folder"


def _bad_line(path: Path, line: int, what: str, reason: str) -> KdkitError:
    return unreadable(f"{path} line {line}", what, reason, BEIR_HINT)


def _read_jsonl(path: Path, what: str) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` of every non-blank line of a JSON-lines file. A file that
    cannot be read, or a line that is not a JSON object with an ``_id``, raises a one-line
    KdkitError naming the file (and line) as ``what``."""
    number = 0
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise _bad_line(path, number, what, f"not valid JSON: {err.msg} (column "
                                                        f"{err.colno})") from None
                if not isinstance(obj, dict) or "_id" not in obj:
                    raise _bad_line(path, number, what, 'not a JSON object with an "_id"')
                yield number, obj
    except UnicodeDecodeError as err:
        raise file_error(f"{path} (after line {number})", what, err,
                         f"it is not UTF-8 text: {BEIR_HINT}") from None
    except OSError as err:
        raise file_error(path, what, err, f"it is corrupt or truncated: {BEIR_HINT}") from None


def _text(obj: dict, key: str, path: Path, line: int, what: str, required: bool = False) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise _bad_line(path, line, what, f'"{key}" is {"missing" if value is None else "not a string"}')
    return value


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    what = "BEIR qrels"
    split: dict[str, dict[str, int]] = {}
    try:
        with open(path, encoding="utf-8") as f:
            rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            try:
                if next(rows, None) is None:  # header: query-id corpus-id score
                    raise file_error(path, what, "empty file", EMPTY_HINT)
                for row in rows:
                    if not any(cell.strip() for cell in row):
                        continue
                    if len(row) < 3:
                        raise _bad_line(path, rows.line_num, what, f"{len(row)} tab-separated fields, "
                                        "not 3 (query-id, corpus-id, score)")
                    try:
                        score = int(row[2])
                    except ValueError:
                        raise _bad_line(path, rows.line_num, what,
                                        f"score {row[2][:20]!r} is not a whole number") from None
                    split.setdefault(row[0], {})[row[1]] = score
            except csv.Error as err:  # e.g. a NUL byte: not a text file
                raise _bad_line(path, rows.line_num, what, f"{type(err).__name__}: {err}") from None
    except UnicodeDecodeError as err:
        raise file_error(path, what, err, f"it is not UTF-8 text: {BEIR_HINT}") from None
    except OSError as err:
        raise file_error(path, what, err, f"it is corrupt or truncated: {BEIR_HINT}") from None
    return split


def read_beir(folder: str | os.PathLike) -> BEIRData:
    """Read a BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/*.tsv``).

    A file that is missing, empty, unreadable, or has a bad line raises a one-line KdkitError
    naming the file (and the line).
    """
    folder = Path(folder)
    for name in ("corpus.jsonl", "queries.jsonl", "qrels"):
        if not (folder / name).exists():
            raise KdkitError(f"{folder} is not a BEIR folder: {name} is missing")
    doc_ids, doc_texts = [], []
    path, what = folder / "corpus.jsonl", "BEIR corpus"
    for line, doc in _read_jsonl(path, what):
        doc_ids.append(str(doc["_id"]))
        title, text = _text(doc, "title", path, line, what), _text(doc, "text", path, line, what)
        doc_texts.append((title + " " + text).strip())
    if not doc_ids:
        raise file_error(path, what, "empty file: no passages", EMPTY_HINT)
    queries = {}
    path, what = folder / "queries.jsonl", "BEIR queries"
    for line, q in _read_jsonl(path, what):
        queries[str(q["_id"])] = _text(q, "text", path, line, what, required=True)
    if not queries:
        raise file_error(path, what, "empty file: no queries", EMPTY_HINT)
    qrels = {path.stem: _read_qrels(path) for path in sorted((folder / "qrels").glob("*.tsv"))}
    return BEIRData(doc_ids, doc_texts, queries, qrels)


def write_beir(data: BEIRData, folder: str | os.PathLike, titles: dict[str, str] | None = None) -> Path:
    """Write ``data`` as a BEIR folder (e.g. a subset for a quick experiment, or test data).

    ``doc_texts`` are written as ``text`` with the title from ``titles`` (default: empty), so
    ``read_beir`` gives back ``(title + " " + text).strip()``.
    """
    folder = Path(folder)
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    titles = titles or {}
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as f:
        for did, text in zip(data.doc_ids, data.doc_texts):
            f.write(json.dumps({"_id": did, "title": titles.get(did, ""), "text": text}) + "\n")
    with open(folder / "queries.jsonl", "w", encoding="utf-8") as f:
        for qid, text in data.queries.items():
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    for split, rels in data.qrels.items():
        with open(folder / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for qid, docs in rels.items():
                for did, rel in docs.items():
                    f.write(f"{qid}\t{did}\t{rel}\n")
    return folder


def _extract(archive: Path, dest: Path) -> Path:
    try:
        from kdkit.datamodules.archives import extract_once
    except ImportError:  # pragma: no cover - the archives helper ships with kdkit
        raise KdkitError("kdkit.datamodules.archives is missing: reinstall kdkit") from None
    return extract_once([archive], dest, what="BEIR zip")


def _beir_folder(root: Path) -> Path:
    """The folder holding ``corpus.jsonl`` at or one level under ``root`` (BEIR zips nest one)."""
    if (root / "corpus.jsonl").is_file():
        return root
    found = sorted(p.parent for p in root.glob("*/corpus.jsonl"))
    if len(found) != 1:
        raise KdkitError(f"expected one BEIR folder (with corpus.jsonl) in {root}, found {len(found)}")
    return found[0]


def locate(name: str | None, path: str | None, data_dir: str | None, cache_dir: str,
           download: bool = False, url: str = BEIR_URL) -> Path:
    """The BEIR folder to read, extracting a zip into ``cache_dir`` once.

    Looks at ``path`` (a folder or a zip), else ``<data_dir>/beir/<name>`` then
    ``<data_dir>/beir/<name>.zip``, else downloads BEIR's zip when ``download`` is true.
    """
    cache = Path(cache_dir).expanduser() / "beir"
    candidates = [Path(path).expanduser()] if path else []
    if not path and name and data_dir:
        base = Path(data_dir).expanduser() / "beir"
        candidates += [base / name, base / f"{name}.zip"]
    for candidate in candidates:
        if candidate.is_dir():
            return _beir_folder(candidate)
        if candidate.is_file() and candidate.suffix == ".zip":
            return _beir_folder(_extract(candidate, cache / candidate.stem))
    if path:
        raise KdkitError(f"data.path={path} is neither a BEIR folder nor a .zip")
    if not name:
        raise KdkitError("set data.name (e.g. scifact) or data.path (a BEIR folder or zip)")
    if not download:
        where = ", ".join(str(c) for c in candidates) or "(no data_dir)"
        raise KdkitError(f"BEIR dataset {name!r} not found at {where}: set KDKIT_DATA_DIR to the folder "
                         f"holding beir/{name}.zip, data.path to a BEIR folder/zip, or data.download=true")
    archive = cache / f"{name}.zip"
    if archive.is_file():  # downloaded before: say so, in case the data dir was meant
        warn_cached(", ".join(str(c) for c in candidates) or "(no data_dir)", archive,
                    f"BEIR dataset {name!r}")
    else:
        archive.parent.mkdir(parents=True, exist_ok=True)
        tmp = archive.with_suffix(f".zip.{os.getpid()}.part")
        try:
            urllib.request.urlretrieve(url.format(name=name), tmp)
        except OSError as exc:
            raise KdkitError(f"download of {url.format(name=name)} failed: {exc}") from exc
        tmp.replace(archive)
    return _beir_folder(_extract(archive, cache / name))


# ---- datasets -------------------------------------------------------------------------------------
class TextStream(Dataset):
    """Unlabeled texts (stream a): sample i is ``texts[i]``, pool row ``pool[i]`` (default i)."""

    def __init__(self, texts: Sequence[str], pool: Sequence[int] | None = None):
        if pool is not None and len(pool) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(pool)} pool indices")
        self.texts = texts
        self.pool = pool

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict:
        return {"text": self.texts[i], "text_pool": i if self.pool is None else self.pool[i], "index": i}


SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")


def split_sentences(text: str, min_words: int = 5) -> list[str]:
    """Sentences of ``text`` with at least ``min_words`` words (split after . ! ? before a capital
    or digit: crude, but abstracts are well punctuated, and a rare bad cut is still real text)."""
    return [s.strip() for s in SENTENCE_END.split(text) if len(s.split()) >= min_words]


def sample_sentences(passages: Sequence[str], per_passage: int, seed: int) -> tuple[list[str], list[int]]:
    """Up to ``per_passage`` sentences of every passage, drawn without replacement with ``seed``
    (in corpus order), and the index of the passage each came from. A passage that is a single
    sentence adds nothing (it is already a text)."""
    g = torch.Generator().manual_seed(seed)
    out, source = [], []
    for i, text in enumerate(passages):
        sentences = split_sentences(text)
        if len(sentences) < 2:
            continue
        pick = torch.randperm(len(sentences), generator=g)[:per_passage].sort().values
        out += [sentences[j] for j in pick.tolist()]
        source += [i] * len(pick)
    return out, source


class TupleStream(Dataset):
    """(query, positive, negatives) tuples (stream b), negatives drawn anew at every access.

    Args:
        pairs: ``(train query number, positive doc number)`` for each relevant qrels pair.
        query_texts, doc_texts: the texts behind those numbers.
        candidates: per train query number, the doc numbers negatives are drawn from.
        num_negatives: negatives per tuple.
        query_offset: pool index of train query 0 (the pool is corpus, then train queries).
    """

    def __init__(self, pairs, query_texts, doc_texts, candidates, num_negatives: int, query_offset: int):
        self.pairs = pairs
        self.query_texts = query_texts
        self.doc_texts = doc_texts
        self.candidates = candidates
        self.num_negatives = int(num_negatives)
        self.query_offset = int(query_offset)

    def __len__(self) -> int:
        return len(self.pairs)

    def sample(self, i: int, generator: torch.Generator | None = None) -> dict:
        q, pos = self.pairs[i]
        pool = self.candidates[q]
        if len(pool) < self.num_negatives:
            raise KdkitError(f"query {q} has {len(pool)} negative candidates < num_negatives={self.num_negatives}")
        pick = torch.randperm(len(pool), generator=generator)[: self.num_negatives].tolist()
        docs = [pos] + [pool[j] for j in pick]
        return {"query": self.query_texts[q], "query_pool": self.query_offset + q,
                "passage": [self.doc_texts[d] for d in docs], "passage_pool": docs, "index": i}

    def __getitem__(self, i: int) -> dict:
        return self.sample(i)


class BothStreams(Dataset):
    """Sample i = text i and tuple ``i mod #tuples`` (one loader feeds both kinds of distiller)."""

    def __init__(self, text: TextStream, tuples: TupleStream):
        self.text, self.tuples = text, tuples

    def __len__(self) -> int:
        return len(self.text)

    def sample(self, i: int, generator: torch.Generator | None = None) -> dict:
        item = self.tuples.sample(i % len(self.tuples), generator)
        item["tuple_index"] = item.pop("index")
        return {**item, **self.text[i]}

    def __getitem__(self, i: int) -> dict:
        return self.sample(i)


class EvalStream(Dataset):
    """Texts to encode for evaluation, with their layout index: corpus ``0..N-1``, then queries
    ``N..N+Q-1``.

    Served in batches of one kind, longest first (little padding), and with the query batches
    spread evenly among the passage batches, so that a run cut short (``limit_test_batches``)
    still holds some of both and gives (partial) metrics.
    """

    def __init__(self, doc_texts: Sequence[str], query_texts: Sequence[str], batch_size: int):
        self.texts = list(doc_texts) + list(query_texts)
        self.num_docs = len(doc_texts)
        docs = sorted(range(self.num_docs), key=lambda i: -len(self.texts[i]))
        queries = sorted(range(self.num_docs, len(self.texts)), key=lambda i: -len(self.texts[i]))
        d_chunks = [docs[i:i + batch_size] for i in range(0, len(docs), batch_size)]
        q_chunks = [queries[i:i + batch_size] for i in range(0, len(queries), batch_size)]
        # Full chunks interleaved, partial ones last, so loader batches stay aligned with chunks.
        tail = [c for c in (d_chunks[-1:] + q_chunks[-1:]) if len(c) < batch_size]
        d_full = [c for c in d_chunks if len(c) == batch_size]
        q_full = [c for c in q_chunks if len(c) == batch_size]
        slots = {round(j * len(d_full) / len(q_full)): [] for j in range(len(q_full))} if q_full else {}
        for j, chunk in enumerate(q_full):
            slots[round(j * len(d_full) / len(q_full))].append(chunk)
        schedule = []
        for i in range(len(d_full) + 1):
            schedule += slots.get(i, [])
            schedule += d_full[i:i + 1]
        self.order = [j for chunk in schedule + tail for j in chunk]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict:
        j = self.order[i]
        return {"text": self.texts[j], "index": j, "is_query": j >= self.num_docs}


class Collate:
    """Tokenize the text fields of a list of samples into a batch dict of tensors.

    ``text`` / ``query`` -> ``<field>_input_ids`` / ``<field>_attention_mask`` ``[B, L]``;
    ``passage`` (a list per sample) -> ``[B * (1 + negatives), L]``, sample-major (the positive
    first in every group). Integer fields become long tensors, flags bool tensors.
    """

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = int(max_length)

    def _tokens(self, texts: list[str]) -> dict[str, Tensor]:
        enc = self.tokenizer(texts, max_length=self.max_length, truncation=True, padding=True,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def __call__(self, samples: list[dict]) -> dict[str, Tensor]:
        batch: dict[str, Tensor] = {}
        for key in samples[0]:
            values = [s[key] for s in samples]
            if key in ("text", "query"):
                texts = values
            elif key == "passage":
                texts = [t for v in values for t in v]
            elif key == "passage_pool":
                batch[key] = torch.tensor([p for v in values for p in v], dtype=torch.long)
                continue
            elif isinstance(values[0], bool):
                batch[key] = torch.tensor(values, dtype=torch.bool)
                continue
            else:
                batch[key] = torch.tensor(values, dtype=torch.long)
                continue
            for name, tensor in self._tokens(texts).items():
                batch[f"{key}_{name}"] = tensor
        return batch


# ---- hard negatives -------------------------------------------------------------------------------
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


# ---- the datamodule -------------------------------------------------------------------------------
class BEIRDataModule(L.LightningDataModule, RetrievalData):
    """A BEIR dataset for dense-retrieval distillation (see the module docstring for the streams;
    ``kdkit.data_contract.RetrievalData``).

    The task calls ``bind(student, teacher)`` in its ``setup``: the student's tokenizer and max
    length are used for batches; the teacher's embeddings of every static training text are
    computed (or read from the cache) and hard negatives mined from them.

    Args:
        name: dataset name, e.g. "scifact" (looked up as ``<data_dir>/beir/<name>[.zip]``).
        path: a BEIR folder or zip; overrides ``name`` / ``data_dir``.
        data_dir: root of the offline data (``$KDKIT_DATA_DIR``).
        cache_dir: where zips are extracted and teacher embeddings cached.
        download: download BEIR's zip when the data is not found (needs network).
        stream: training stream: "text", "tuples" or "both".
        train_split, test_split: qrels splits used for training tuples / testing.
        val_queries: train queries held out as a validation split (0: no validation); they leave
            every training stream.
        include_queries: add the train queries to the unlabeled text stream.
        corpus_sentences: sentences cut from each corpus passage (drawn with ``seed``) that join
            the text stream: short, query-like text, the kind of input a query encoder sees
            (0: none).
        sentence_target: a sentence's distillation target: "sentence" (the teacher's embedding
            of the sentence) or "passage" (of the passage it was cut from: the student learns to
            map a short text to its document's embedding, the Inverse Cloze Task of Lee et al.
            2019 with the teacher's embedding as the label).
        max_length: tokens per training text (the teacher targets keep the teacher's own length).
        group_by_length: text stream only: batch texts of similar token length together
            (``LengthGroupedBatchSampler``), so short texts (queries, sentences) are not padded to
            the passages' length.
        target_max_length: tokens per text of the teacher's distillation targets (None: the
            teacher's own max length; ``max_length`` makes target and student input the same
            text). Evaluation (the asymmetric index included) always uses the teacher's length.
        eval_max_length: tokens per evaluated text (None: the bound student's ``max_length``).
        num_negatives: hard negatives per tuple.
        negative_ranks: ``[lo, hi)`` ranks (positives removed) of the teacher's ranking that
            negatives are drawn from.
        tokenizer: tokenizer source used until a student is bound (None: all-MiniLM-L6-v2's).
        batch_size, eval_batch_size: training / evaluation batch sizes.
        teacher_batch_size: batch size of the one-off teacher encoding.
        num_workers: loader worker processes.
        seed: seeds the shuffle, the validation hold-out and the example batch.
    """

    num_classes = None  # retrieval data has no class labels
    teacher_table: Tensor | None = None  # [N_docs + N_train_queries (+ sentences), D]
    teacher_index: Tensor | None = None  # [N_docs, D], teacher's own length
    eval_max_length: int | None = None  # set by bind() from the student unless given
    fixed_shards: bool = False  # True after use_fixed_shards(): see kdkit.data_contract
    teacher_input_fingerprint: str | None = None  # the data config stands for the teacher's inputs

    @property
    def static_for_teacher(self) -> bool:
        """True for the text stream: a text's teacher embedding never changes (no augmentation);
        tuple streams draw fresh negatives every epoch."""
        return self.stream == "text"

    def use_fixed_shards(self) -> None:
        """Keep every DDP rank on a fixed training shard (a per-rank teacher cache asks)."""
        self.fixed_shards = True

    def __init__(self, name: str | None = "scifact", path: str | None = None, data_dir: str | None = None,
                 cache_dir: str = "~/.cache/kdkit", download: bool = False, stream: str = "text",
                 train_split: str = "train", test_split: str = "test", val_queries: int = 0,
                 include_queries: bool = True, corpus_sentences: int = 0, sentence_target: str = "sentence",
                 max_length: int = 128, group_by_length: bool = False, eval_max_length: int | None = None,
                 target_max_length: int | None = None,
                 num_negatives: int = 4, negative_ranks: Sequence[int] = (3, 30), tokenizer: str | None = None,
                 batch_size: int = 32, eval_batch_size: int = 64, teacher_batch_size: int = 64,
                 num_workers: int = 0, seed: int = 0):
        super().__init__()
        check_loader_options(batch_size, eval_batch_size, num_workers,
                             teacher_batch_size=teacher_batch_size)
        if stream not in STREAMS:
            raise KdkitError(f"data.stream={stream!r}: use one of {', '.join(STREAMS)}")
        self.name, self.path, self.data_dir = name, path, data_dir or os.environ.get("KDKIT_DATA_DIR")
        self.cache_dir = Path(os.path.expanduser(cache_dir))
        self.download = download
        self.stream = stream
        self.train_split, self.test_split = train_split, test_split
        self.val_queries = int(val_queries)
        self.include_queries = include_queries
        if int(corpus_sentences) < 0:
            raise KdkitError(f"data.corpus_sentences={corpus_sentences}: use 0 (none) or more")
        self.corpus_sentences = int(corpus_sentences)
        if sentence_target not in SENTENCE_TARGETS:
            raise KdkitError(f"data.sentence_target={sentence_target!r}: use one of {', '.join(SENTENCE_TARGETS)}")
        self.sentence_target = sentence_target
        self.max_length = int(max_length)
        if group_by_length and stream != "text":
            raise KdkitError(f"data.group_by_length=true needs data.stream=text (got {stream!r}): "
                             "tuple batches hold queries and passages together")
        self.group_by_length = bool(group_by_length)
        self.eval_max_length_arg = eval_max_length
        self.target_max_length = None if target_max_length is None else int(target_max_length)
        self.num_negatives = int(num_negatives)
        self.negative_ranks = tuple(int(r) for r in negative_ranks)
        self.tokenizer_source = tokenizer
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.teacher_batch_size = int(teacher_batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.data: BEIRData | None = None
        self.tokenizer = None
        self.eval_max_length = eval_max_length
        self.teacher_table: Tensor | None = None  # [N_docs + N_train_queries (+ sentences), D]
        self.teacher_index: Tensor | None = None  # [N_docs, D], teacher's own length
        self.negatives: list[list[int]] | None = None
        self._train_set = None

    # ---- data ------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        locate(self.name, self.path, self.data_dir, str(self.cache_dir), self.download)

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        folder = locate(self.name, self.path, self.data_dir, str(self.cache_dir), self.download)
        self.data = read_beir(folder)
        self.fingerprint = self.data.fingerprint()
        train = self.data.split_qrels(self.train_split)
        test = self.data.split_qrels(self.test_split)
        missing = [q for q in list(train) + list(test) if q not in self.data.queries]
        if missing:
            raise KdkitError(f"{len(missing)} qrels queries are not in queries.jsonl (e.g. {missing[0]})")
        self.doc_index = {d: i for i, d in enumerate(self.data.doc_ids)}
        train_ids = sorted(q for q, docs in train.items() if any(r > 0 for r in docs.values()))
        if set(train_ids) & set(test):
            raise KdkitError(f"qrels splits {self.train_split} and {self.test_split} share queries")
        if self.val_queries >= len(train_ids):
            raise KdkitError(f"data.val_queries={self.val_queries} >= {len(train_ids)} train queries")
        perm = torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(self.seed)).tolist()
        held = {train_ids[i] for i in perm[: self.val_queries]}
        self.val_ids = sorted(held)
        self.train_query_ids = [q for q in train_ids if q not in held]
        self.test_ids = sorted(test)
        self.train_pairs = [(qi, self.doc_index[d]) for qi, q in enumerate(self.train_query_ids)
                            for d, r in sorted(train[q].items()) if r > 0 and d in self.doc_index]
        self.train_positives = [{self.doc_index[d] for d, r in train[q].items() if r > 0 and d in self.doc_index}
                                for q in self.train_query_ids]
        self.sentences, self.sentence_source = (
            sample_sentences(self.data.doc_texts, self.corpus_sentences, self.seed)
            if self.corpus_sentences else ([], []))

    def _require_setup(self) -> None:
        if self.data is None:
            self.setup("fit")

    @property
    def num_docs(self) -> int:
        self._require_setup()
        return len(self.data.doc_ids)

    @property
    def train_query_texts(self) -> list[str]:
        self._require_setup()
        return [self.data.queries[q] for q in self.train_query_ids]

    @property
    def own_sentence_targets(self) -> bool:
        """Whether sampled sentences have teacher-table rows of their own (after the queries)."""
        return bool(self.sentences) and self.sentence_target == "sentence"

    @property
    def pool_texts(self) -> list[str]:
        """Every text with a teacher-table row (pool indices): corpus passages, train queries,
        then sentences when they are their own targets."""
        return self.data.doc_texts + self.train_query_texts + (self.sentences if self.own_sentence_targets else [])

    @property
    def sentence_kind(self) -> str:
        """The static-text name of the sampled sentences (their cache key: count and seed)."""
        return f"sentences{self.corpus_sentences}-seed{self.seed}"

    @property
    def num_train_samples(self) -> int:
        return len(self.train_set)

    # ---- models ----------------------------------------------------------------------------
    def bind(self, student=None, teacher=None) -> None:
        """Use ``student``'s tokenizer and length for batches; compute the teacher's table.

        ``teacher_table`` rows: teacher embeddings of the pool texts (corpus, train queries,
        sentences) at ``target_max_length``; cached on disk under the teacher's fingerprint.
        ``teacher_index``: the teacher's corpus embeddings at its own max length, the index of
        the asymmetric evaluation (whatever length the training targets use).
        """
        self._require_setup()
        if student is not None:
            self.tokenizer = student.tokenizer
            self.eval_max_length = self.eval_max_length_arg or student.max_length
        self.teacher_table, self.teacher_index, self.negatives = None, None, None
        if teacher is not None:
            corpus = self.static_embeddings(teacher, "corpus", self.target_max_length)
            self.teacher_index = self.static_embeddings(teacher, "corpus")  # own length (cached)
            queries = self.static_embeddings(teacher, f"queries-{self.train_split}", self.target_max_length)
            parts = [corpus, queries]
            if self.own_sentence_targets:
                parts.append(self.static_embeddings(teacher, self.sentence_kind, self.target_max_length))
            self.teacher_table = torch.cat(parts)
            if self.stream != "text":
                self.negatives = mine_negatives(queries, corpus, self.train_positives, self.negative_ranks)
        self._train_set = None

    def static_texts(self, kind: str) -> list[str]:
        """``corpus``, ``queries-<split>`` or ``sentence_kind`` texts (in layout order)."""
        self._require_setup()
        if kind == "corpus":
            return self.data.doc_texts
        if kind == f"queries-{self.train_split}":
            return self.train_query_texts
        if kind == f"queries-{self.test_split}":
            return [self.data.queries[q] for q in self.test_ids]
        if self.sentences and kind == self.sentence_kind:
            return self.sentences
        raise KdkitError(f"unknown static text set {kind!r}")

    def _cache_file(self, encoder, kind: str, max_length: int) -> Path:
        folder = self.cache_dir / "retrieval" / f"{self.name or 'beir'}-{self.fingerprint[:12]}"
        return folder / f"{kind}-{encoder.fingerprint()[:16]}-L{max_length}.pt"

    def cached_embeddings(self, encoder, kind: str, max_length: int | None = None) -> Tensor | None:
        path = self._cache_file(encoder, kind, max_length or encoder.max_length)
        if not path.is_file():
            return None
        try:
            return torch.load(path, weights_only=True)
        except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as err:
            raise file_error(path, "cached teacher embeddings", err,
                             "delete it: kdkit encodes the texts again") from None

    def store_embeddings(self, encoder, kind: str, embeddings: Tensor, max_length: int | None = None) -> None:
        """Cache embeddings of a static text set under ``encoder``'s fingerprint (atomic write)."""
        path = self._cache_file(encoder, kind, max_length or encoder.max_length)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(embeddings.detach().float().cpu().contiguous(), tmp)
        tmp.replace(path)

    def static_embeddings(self, encoder, kind: str, max_length: int | None = None) -> Tensor:
        """Embeddings of ``static_texts(kind)`` by ``encoder`` at ``max_length`` (None: its own):
        cache, else encode."""
        cached = self.cached_embeddings(encoder, kind, max_length)
        if cached is not None:
            return cached
        emb = encoder.encode(self.static_texts(kind), batch_size=self.teacher_batch_size, progress=True,
                             max_length=max_length, desc=f"teacher {kind}")
        self.store_embeddings(encoder, kind, emb, max_length)
        return emb

    # ---- streams ---------------------------------------------------------------------------
    def _tokenizer(self):
        if self.tokenizer is None:
            from kdkit.models.text import load_tokenizer, resolve_name_or_path

            self.tokenizer = load_tokenizer(resolve_name_or_path(self.tokenizer_source))
        return self.tokenizer

    def _candidates(self) -> list[list[int]]:
        if self.negatives is not None:
            return self.negatives
        # No teacher bound (baseline stage): negatives are random non-positive passages.
        g = torch.Generator().manual_seed(self.seed)
        k = max(self.negative_ranks[1] - self.negative_ranks[0], self.num_negatives)
        out = []
        for pos in self.train_positives:
            draw = torch.randperm(self.num_docs, generator=g)[: k + len(pos)].tolist()
            out.append([d for d in draw if d not in pos][:k])
        return out

    @property
    def train_set(self) -> Dataset:
        self._require_setup()
        if self._train_set is None:
            queries = self.train_query_texts if self.include_queries else []
            pool = list(range(self.num_docs + len(queries)))
            if self.own_sentence_targets:  # their rows follow every train query's
                offset = self.num_docs + len(self.train_query_texts)
                targets = list(range(offset, offset + len(self.sentences)))
            else:  # the passage each was cut from
                targets = self.sentence_source
            text = TextStream(self.data.doc_texts + queries + self.sentences, pool + targets)
            if self.stream == "text":
                self._train_set = text
            else:
                tuples = TupleStream(self.train_pairs, self.train_query_texts, self.data.doc_texts,
                                     self._candidates(), self.num_negatives, query_offset=self.num_docs)
                self._train_set = tuples if self.stream == "tuples" else BothStreams(text, tuples)
        return self._train_set

    def example_batch(self, n: int | None = None) -> dict[str, Tensor]:
        """The first ``n`` (default 4) training samples (fixed negatives), tokenized like a
        training batch."""
        dataset = self.train_set
        g = torch.Generator().manual_seed(self.seed)
        n = min(4 if n is None else n, len(dataset))
        items = [dataset.sample(i, g) if hasattr(dataset, "sample") else dataset[i] for i in range(n)]
        return Collate(self._tokenizer(), self.max_length)(items)

    def passage_texts(self, n: int) -> list[str]:
        """``n`` corpus passages drawn with the seed (for throughput measurements)."""
        self._require_setup()
        pick = torch.randperm(self.num_docs, generator=torch.Generator().manual_seed(self.seed))[:n]
        return [self.data.doc_texts[i] for i in pick.tolist()]

    def eval_layout(self, stage: str) -> tuple[list[str], list[str], dict[str, dict[str, int]]]:
        """``(doc_ids, query_ids, qrels)`` behind the eval stream's indices for ``stage``."""
        self._require_setup()
        if stage == "val":
            train = self.data.split_qrels(self.train_split)
            return self.data.doc_ids, self.val_ids, {q: train[q] for q in self.val_ids}
        return self.data.doc_ids, self.test_ids, self.data.split_qrels(self.test_split)

    # ---- loaders ---------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        dataset = self.train_set
        if len(dataset) < self.batch_size:
            raise KdkitError(f"batch_size={self.batch_size} exceeds the {len(dataset)} training samples")
        collate = Collate(self._tokenizer(), self.max_length)
        order = EpochShuffleSampler(dataset, seed=self.seed)  # same order when resumed mid-run
        if self.fixed_shards and world()[1] > 1:
            order = FixedShardSampler(dataset, seed=self.seed)
        workers = {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}
        if self.group_by_length:
            lengths = [len(ids) for ids in self._tokenizer()(list(dataset.texts), truncation=True,
                                                             max_length=self.max_length)["input_ids"]]
            batches = LengthGroupedBatchSampler(order, self.batch_size,
                                                drop_last=True, lengths=lengths, seed=self.seed)
            return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, **workers)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=order,
                          drop_last=True,  # equal shapes on every rank for cross-rank gathers
                          collate_fn=collate, **workers)

    def _eval_loader(self, stage: str) -> DataLoader:
        doc_ids, query_ids, _ = self.eval_layout(stage)
        dataset = EvalStream(self.data.doc_texts, [self.data.queries[q] for q in query_ids], self.eval_batch_size)
        length = self.eval_max_length or getattr(self._tokenizer(), "model_max_length", 512)
        return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=Collate(self._tokenizer(), min(int(length), 512)),
                          num_workers=self.num_workers)

    def val_dataloader(self):
        self._require_setup()
        return self._eval_loader("val") if self.val_ids else []

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
