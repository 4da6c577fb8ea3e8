"""Scorer teachers: models that score (query, passage) pairs instead of embedding texts.

A bi-encoder embeds a query and a passage apart and scores them by a dot product; a scorer reads
the pair and gives one number. Scorers are stronger and far slower, so in dense-retrieval
distillation they never run in a training step: ``kdkit.tasks.retrieval_scores`` scores every
(train query, candidate passage) pair the tuple stream can draw once, before training, and the
score distillers (Margin-MSE, group listwise KL) read the table (``features["scores"]``).

- ``CrossEncoder``: a transformers sequence-classification model over the joint pair tokens.
- ``MaxSimScorer``: late interaction (ColBERT's MaxSim) over a ``TextEncoder``'s token states.

Both answer ``score_pairs(queries, passages, pairs)`` (the table builder's call: each distinct
text once in the lists, ``pairs`` addressing them) and ``score(queries, passages)`` (the i-th
query with the i-th passage), and ``fingerprint()`` (cache key of their scores).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.errors import KdkitError


class Scorer(nn.Module):
    """Common interface of pair scorers (``scores_pairs`` marks them for the retrieval task and
    the pipeline: a scorer cannot retrieve by itself, so it has no evaluation stage of its own).

    Subclasses implement ``score_pairs``; ``tokenizer`` and ``max_length`` describe their input.
    """

    scores_pairs = True

    def score(self, queries: Sequence[str], passages: Sequence[str], batch_size: int = 64) -> Tensor:
        """``[N]`` float32 scores of ``queries[i]`` with ``passages[i]``."""
        if len(queries) != len(passages):
            raise KdkitError(f"score: {len(queries)} queries for {len(passages)} passages (pairs)")
        n = len(queries)
        pairs = torch.stack([torch.arange(n), torch.arange(n)], dim=1)
        return self.score_pairs(list(queries), list(passages), pairs, batch_size=batch_size)

    def score_pairs(self, queries: Sequence[str], passages: Sequence[str], pairs: Tensor,
                    batch_size: int = 64, progress: bool = False, desc: str = "score") -> Tensor:
        """``[N]`` float32 CPU scores of ``(queries[pairs[k, 0]], passages[pairs[k, 1]])``."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Hash of everything that decides the scores (weights, tokenizer, lengths, kind)."""
        from kdkit.models.text import tokenizer_identity

        digest = hashlib.sha1(f"{type(self).__name__}|{self.extra_repr()}".encode())
        digest.update(tokenizer_identity(self.tokenizer).encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def _device(self) -> torch.device:
        return next(self.parameters()).device


def _batches(n: int, batch_size: int, progress: bool, desc: str):
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    return starts


class CrossEncoder(Scorer):
    """A cross-encoder (Nogueira & Cho 2019, "Passage Re-ranking with BERT"): the transformer
    reads ``[CLS] query [SEP] passage [SEP]`` and its one classification logit is the score,
    s(q, p) = w^T h_[CLS](q ; p) + b. The teacher of Margin-MSE (Hofstätter et al. 2020) and of
    RocketQA's denoising (Qu et al. 2021).

    Args:
        model: a transformers ``*ForSequenceClassification`` model with ``num_labels == 1``.
        tokenizer: its tokenizer (pairs are encoded with ``tokenizer(queries, passages)``).
        max_length: tokens per pair; the longer text of a pair is cut first (``longest_first``:
            the passage, for all but very long queries).
    """

    def __init__(self, model: nn.Module, tokenizer, max_length: int = 512):
        super().__init__()
        labels = getattr(model.config, "num_labels", None)
        if labels != 1:
            raise KdkitError(f"cross-encoder with num_labels={labels}: kdkit reads one relevance logit "
                             "(a sentence-transformers CrossEncoder trained with one label)")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(max_length)

    def forward(self, queries: Sequence[str], passages: Sequence[str]) -> Tensor:
        enc = self.tokenizer(list(queries), list(passages), max_length=self.max_length, padding=True,
                             truncation="longest_first", return_tensors="pt")
        enc = {k: v.to(self._device()) for k, v in enc.items()}
        return self.model(**enc).logits[:, 0]

    @torch.no_grad()
    def score_pairs(self, queries, passages, pairs, batch_size=64, progress=False, desc="score"):
        was_training = self.training
        self.eval()
        out = []
        try:
            for start in _batches(len(pairs), batch_size, progress, desc):
                chunk = pairs[start:start + batch_size].tolist()
                out.append(self([queries[q] for q, _ in chunk], [passages[p] for _, p in chunk]).float().cpu())
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.empty(0)

    def extra_repr(self) -> str:
        return f"max_length={self.max_length}"


class MaxSimScorer(Scorer):
    """Late-interaction MaxSim (Khattab & Zaharia 2020, ColBERT; the teacher of TCT-ColBERT,
    Lin et al. 2021) over the token states of a bi-encoder's transformer:

        s(q, p) = sum_{i in q} max_{j in p} <E_q,i / |E_q,i|, E_p,j / |E_p,j|>

    with ``E`` the backbone's ``last_hidden_state`` of the text read alone. Every real token
    counts, the special ``[CLS]`` and ``[SEP]`` included (ColBERT keeps its markers too);
    padding never does. It is NOT a trained ColBERT: with all-MiniLM-L6-v2 (``minilm_maxsim``)
    it is MaxSim over token states that were trained for mean pooling, a different teacher
    from the same weights.

    Args:
        encoder: a ``kdkit.models.text.TextEncoder`` (its pooling/projection are unused).
        query_max_length, passage_max_length: tokens per query / passage (None: the encoder's).
        reduction: "sum" over query tokens (ColBERT), or "mean": divided by the query's token
            count, a score in [-1, 1] on the scale of a normalised bi-encoder's cosine (Margin-MSE
            matches raw margins, so a cosine student cannot follow summed margins).
    """

    def __init__(self, encoder: nn.Module, query_max_length: int | None = None,
                 passage_max_length: int | None = None, reduction: str = "sum"):
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise KdkitError(f"MaxSim reduction={reduction!r}: use sum or mean")
        self.reduction = reduction
        self.encoder = encoder
        self.tokenizer = encoder.tokenizer
        self.query_max_length = int(query_max_length or encoder.max_length)
        self.passage_max_length = int(passage_max_length or encoder.max_length)
        self.max_length = self.passage_max_length

    def token_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``[B, L, H]`` L2-normalised token states (padding rows are zeroed)."""
        hidden = self.encoder.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(hidden.float(), dim=-1) * attention_mask.unsqueeze(-1).to(hidden.dtype)

    def forward(self, q_states: Tensor, q_mask: Tensor, p_states: Tensor, p_mask: Tensor) -> Tensor:
        """MaxSim of pairs: ``[N, Lq, H]`` / ``[N, Lp, H]`` normalised states and masks -> ``[N]``."""
        sim = q_states.float() @ p_states.float().transpose(1, 2)  # [N, Lq, Lp]
        sim = sim.masked_fill(~p_mask.bool().unsqueeze(1), float("-inf"))
        best = sim.max(dim=2).values.masked_fill(~q_mask.bool(), 0.0).sum(dim=1)
        return best / q_mask.sum(dim=1).clamp(min=1) if self.reduction == "mean" else best

    def _encode(self, texts: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
        enc = self.tokenizer(list(texts), max_length=max_length, truncation=True, padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"].to(self._device()), enc["attention_mask"].to(self._device())
        return self.token_states(ids, mask), mask

    @torch.no_grad()
    def score_pairs(self, queries, passages, pairs, batch_size=64, progress=False, desc="score"):
        """Each query and each passage is read once: the queries' token states are kept, the
        passages are read in batches, each scored with every query it is paired with."""
        was_training = self.training
        self.eval()
        pairs = torch.as_tensor(pairs, dtype=torch.long).reshape(-1, 2)
        out = torch.empty(len(pairs))
        try:
            used_q = pairs[:, 0].unique()
            q_states, q_mask = [], []
            for start in range(0, len(used_q), batch_size):
                s, m = self._encode([queries[i] for i in used_q[start:start + batch_size].tolist()],
                                    self.query_max_length)
                q_states.append(s.cpu())
                q_mask.append(m.cpu())
            width = max((m.shape[1] for m in q_mask), default=0)
            q_states = torch.cat([F.pad(s, (0, 0, 0, width - s.shape[1])) for s in q_states])
            q_mask = torch.cat([F.pad(m, (0, width - m.shape[1])) for m in q_mask])
            q_row = torch.full((len(queries),), -1, dtype=torch.long)
            q_row[used_q] = torch.arange(len(used_q))
            used_p = pairs[:, 1].unique()
            for start in _batches(len(used_p), batch_size, progress, desc):
                chunk = used_p[start:start + batch_size]
                p_states, p_mask = self._encode([passages[i] for i in chunk.tolist()], self.passage_max_length)
                local = torch.full((len(passages),), -1, dtype=torch.long)
                local[chunk] = torch.arange(len(chunk))
                which = (local[pairs[:, 1]] >= 0).nonzero().squeeze(1)
                for sub in which.split(4 * batch_size):  # bounded [n, Lq, Lp] similarity blocks
                    q = q_row[pairs[sub, 0]]
                    p = local[pairs[sub, 1]].to(p_states.device)
                    dev = p_states.device
                    out[sub] = self(q_states[q].to(dev), q_mask[q].to(dev), p_states[p], p_mask[p]).float().cpu()
        finally:
            self.train(was_training)
        return out

    def extra_repr(self) -> str:
        return (f"query_max_length={self.query_max_length}, passage_max_length={self.passage_max_length}, "
                f"reduction={self.reduction}")


def cross_encoder(name_or_path: str, max_length: int | None = None) -> CrossEncoder:
    """A ``CrossEncoder`` from a local folder or hub name (a sentence-transformers CrossEncoder
    or any ``AutoModelForSequenceClassification`` folder with one label)."""
    from transformers import AutoModelForSequenceClassification

    from kdkit.models.text_source import check_source, default_max_length, hub_error, load_tokenizer

    if not name_or_path:
        raise KdkitError("teacher.model.name_or_path: give a cross-encoder (local folder or hub name, "
                         "e.g. cross-encoder/ms-marco-MiniLM-L-6-v2)")
    name_or_path = os.fspath(name_or_path)
    check_source(name_or_path)
    tokenizer = load_tokenizer(name_or_path)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise hub_error(name_or_path, exc) from exc
    return CrossEncoder(model, tokenizer, max_length or default_max_length(tokenizer, model))


def maxsim_scorer(name_or_path: str | None = None, query_max_length: int | None = None,
                  passage_max_length: int | None = None, reduction: str = "sum") -> MaxSimScorer:
    """MaxSim over the token states of ``kdkit.models.text.sentence_encoder(name_or_path)``
    (None: all-MiniLM-L6-v2, resolved like ``conf/teacher/minilm.yaml``)."""
    from kdkit.models.text import sentence_encoder

    return MaxSimScorer(sentence_encoder(name_or_path), query_max_length, passage_max_length, reduction)


def is_scorer(model) -> bool:
    """True for pair scorers (a ``FrozenTeacher`` is looked through)."""
    if getattr(model, "scores_pairs", False):
        return True
    from kdkit.teacher import FrozenTeacher

    return isinstance(model, FrozenTeacher) and bool(getattr(model.model, "scores_pairs", False))
