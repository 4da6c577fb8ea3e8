"""What the BEIR datamodule serves: training streams, the evaluation stream, and batching.

Training streams (``data.stream``):

- ``text`` (``TextStream``): unlabeled text, one text per sample: corpus passages, train
  queries, and sentences cut from the passages (``sample_sentences``: short, query-like texts).
- ``tuples`` (``TupleStream``): ``(query, positive, negatives)`` from the train qrels, the
  negatives drawn fresh at every access from per-query candidate lists.
- ``both`` (``BothStreams``): sample i is text i plus tuple ``i mod #tuples``.

Every training sample carries ``*_pool``: the row of each of its texts in the pool of static
training texts (corpus, train queries, then sentences with targets of their own), where the task
finds the teacher's embedding. ``EvalStream`` serves the texts to encode for evaluation, and
``Collate`` tokenizes samples into batch dicts of tensors.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from kdkit.errors import KdkitError


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

