"""BEIR-format retrieval data: a corpus, queries and qrels; training streams and an eval stream.

This file holds the datamodule; the jobs it draws on live next to it:

- ``beir_format``: reading (and writing, locating, extracting) the BEIR files: ``BEIRData``.
- ``beir_streams``: the training streams, the eval stream and batching (``Collate``).
- ``beir_negatives``: the tuple streams' negative candidates (checked, or drawn at random).

Streams (``stream``):

- ``text``: unlabeled text, one text per sample: every corpus passage and every *train* query
  (embedding distillation, LEAF), plus ``corpus_sentences`` sentences cut from each passage:
  short, query-like texts (a query is one claim or question; a passage is a whole abstract),
  whose target is the teacher's embedding of the sentence or of its passage (``sentence_target``).
- ``tuples``: ``(query, positive, negatives)`` from the train qrels; the negatives are drawn,
  fresh every epoch, from per-query candidates: the teacher's top-ranked non-positive passages
  when the task hands them over (``use_negatives``), else random non-positive passages.
- ``both``: sample i is text i plus tuple ``i mod #tuples``.

Test (and validation) batches are the texts to encode: every corpus passage, then the split's
queries. Test queries and test qrels are never part of a training stream.

The datamodule runs no model. Every static training text (corpus passages, train queries,
sentences with targets of their own) has a row in the *pool* (``static_pool``), and every batch
carries the pool rows of its texts (``*_pool``); the retrieval task embeds the pool with its
teacher once (``kdkit.tasks.retrieval_table``) and looks the rows up, so training never runs the
teacher. The task hands back only data: the student's tokenizer (``use_tokenizer``) and the
hard negatives mined from the teacher's ranking (``use_negatives``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kdkit.data_contract import RetrievalData, StaticPool
from kdkit.datamodules.base import check_loader_options
from kdkit.datamodules.beir_format import BEIR_URL, BEIRData, locate, read_beir, write_beir
from kdkit.datamodules.beir_negatives import checked_negatives, random_negatives
from kdkit.datamodules.beir_streams import (BothStreams, Collate, EvalStream, TextStream, TupleStream,
                                            sample_sentences, split_sentences)
from kdkit.datamodules.length_grouping import LengthGroupedBatchSampler
from kdkit.distributed import FixedShardSampler, world
from kdkit.errors import KdkitError
from kdkit.resumable_loader import ResumableLoader
from kdkit.sampling import EpochShuffleSampler

__all__ = ["BEIRDataModule", "BEIRData", "BEIR_URL", "BothStreams", "Collate", "EvalStream", "TextStream",
           "TupleStream", "locate", "read_beir", "sample_sentences", "split_sentences", "write_beir"]

STREAMS = ("text", "tuples", "both")
SENTENCE_TARGETS = ("sentence", "passage")


class BEIRDataModule(L.LightningDataModule, RetrievalData):
    """A BEIR dataset for dense-retrieval distillation (see the module docstring for the streams;
    ``kdkit.data_contract.RetrievalData``).

    It runs no model. The task, in its ``setup``, gives it the student's tokenizer
    (``use_tokenizer``), reads the static training texts (``static_pool``) to embed them with
    its teacher, and hands back the hard negatives mined from the teacher's ranking
    (``use_negatives``).

    Args:
        name: dataset name, e.g. "scifact" (looked up as ``<data_dir>/beir/<name>[.zip]``).
        path: a BEIR folder or zip; overrides ``name`` / ``data_dir``.
        data_dir: root of the offline data (``$KDKIT_DATA_DIR``).
        cache_dir: where zips are extracted (and, under ``static_pool().cache_dir``, the task
            caches embeddings of this data).
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
        eval_max_length: tokens per evaluated text (None: the ``max_length`` given with the
            tokenizer, the student's).
        num_negatives: hard negatives per tuple.
        negative_ranks: ``[lo, hi)`` ranks (positives removed) of the teacher's ranking that
            negatives are drawn from (read by the task's negative mining, ``static_pool``).
        tokenizer: tokenizer source used until one is given (None: all-MiniLM-L6-v2's).
        batch_size, eval_batch_size: training / evaluation batch sizes.
        teacher_batch_size: batch size of the task's one-off teacher encoding (``static_pool``).
        num_workers: loader worker processes.
        seed: seeds the shuffle, the validation hold-out and the example batch.
    """

    num_classes = None  # retrieval data has no class labels
    eval_max_length: int | None = None  # set by use_tokenizer() from the model unless given
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
        self.negatives: list[list[int]] | None = None  # per train query: corpus rows (use_negatives)
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
        """Whether sampled sentences have pool rows of their own (after the queries)."""
        return bool(self.sentences) and self.sentence_target == "sentence"

    @property
    def pool_texts(self) -> list[str]:
        """Every text with a pool row (``*_pool`` indices; a teacher-table row): corpus
        passages, train queries, then sentences when they are their own targets."""
        return [text for texts in self.static_pool().texts.values() for text in texts]

    @property
    def sentence_kind(self) -> str:
        """The static-text name of the sampled sentences (their cache key: count and seed)."""
        return f"sentences{self.corpus_sentences}-seed{self.seed}"

    @property
    def num_train_samples(self) -> int:
        return len(self.train_set)

    @property
    def train_query_kind(self) -> str:
        """The static-text name of the train queries (their cache key): the qrels split, and the
        held-out validation queries when there are any (they leave the set; seed-dependent)."""
        held = f"-heldout{self.val_queries}-seed{self.seed}" if self.val_queries else ""
        return f"queries-{self.train_split}{held}"

    def static_texts(self, kind: str) -> list[str]:
        """``corpus``, ``train_query_kind``, ``queries-<test split>`` or ``sentence_kind`` texts
        (in layout order)."""
        self._require_setup()
        if kind == "corpus":
            return self.data.doc_texts
        if kind == self.train_query_kind:
            return self.train_query_texts
        if kind == f"queries-{self.test_split}":
            return [self.data.queries[q] for q in self.test_ids]
        if self.sentences and kind == self.sentence_kind:
            return self.sentences
        raise KdkitError(f"unknown static text set {kind!r}")

    def static_pool(self) -> StaticPool:
        """The pool texts by set (corpus, train queries, then sentences when they are their own
        targets), the train positives, and the options of the task's teacher encoding and
        negative mining (``kdkit.data_contract.StaticPool``)."""
        self._require_setup()
        kinds = ["corpus", self.train_query_kind] + ([self.sentence_kind] if self.own_sentence_targets else [])
        lo, hi = self.negative_ranks
        return StaticPool(
            texts={kind: self.static_texts(kind) for kind in kinds}, positives=self.train_positives,
            negative_ranks=None if self.stream == "text" else (lo, hi),
            target_max_length=self.target_max_length, batch_size=self.teacher_batch_size,
            cache_dir=self.cache_dir / "retrieval" / f"{self.name or 'beir'}-{self.fingerprint[:12]}",
            corpus_kind="corpus", query_kind=self.train_query_kind)

    # ---- what the task hands over ------------------------------------------------------------
    def use_tokenizer(self, tokenizer, max_length: int | None = None) -> None:
        """Tokenize batches with ``tokenizer``; ``max_length`` (the model's own) becomes
        ``eval_max_length`` unless ``data.eval_max_length`` is set."""
        self.tokenizer = tokenizer
        self.eval_max_length = self.eval_max_length_arg or max_length

    def use_negatives(self, negatives: Sequence[Sequence[int]] | None) -> None:
        """Draw tuple negatives from ``negatives`` (per train query, corpus rows: ints or a 1-D
        index tensor; checked: one row per train query, no positive), None: from random
        non-positive passages."""
        if negatives is not None:
            self._require_setup()
            negatives = checked_negatives(negatives, self.train_positives, self.num_docs)
        self.negatives = negatives
        self._train_set = None

    # ---- streams ---------------------------------------------------------------------------
    def _tokenizer(self):
        if self.tokenizer is None:
            from kdkit.models.text_source import load_tokenizer, resolve_name_or_path

            self.tokenizer = load_tokenizer(resolve_name_or_path(self.tokenizer_source))
        return self.tokenizer

    def _candidates(self) -> list[list[int]]:
        if self.negatives is not None:
            return self.negatives
        # None handed over (a stage without a teacher): random non-positive passages.
        k = max(self.negative_ranks[1] - self.negative_ranks[0], self.num_negatives)
        return random_negatives(self.train_positives, self.num_docs, k, self.seed)

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
            return ResumableLoader(dataset, batch_sampler=batches, collate_fn=collate, **workers)
        return ResumableLoader(dataset, batch_size=self.batch_size, sampler=order,
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
