"""Dense retrieval: bi-encoders embed queries and passages; nDCG@10, Recall@100, MRR@10."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from kdkit.distributed import gather, world
from kdkit.data_contract import RetrievalData
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs
from kdkit.retrieval_metrics import DEFAULT_METRICS, retrieval_metrics
from kdkit.tasks.base import DistillationTask
from kdkit.tasks.retrieval_dims import check_eval_dims, truncated_metrics
from kdkit.tasks.retrieval_exits import ExitEvaluation, check_exits, save_exits
from kdkit.tasks.retrieval_layers import layer_outputs, requests, split
from kdkit.tasks.retrieval_table import FIELDS, EmbeddingCache, embedding_outputs as _outputs
from kdkit.tasks.retrieval_teachers import check_options, prepare_teachers, split_teachers
from kdkit.teacher_source import TeacherSource


class RetrievalTask(DistillationTask):
    """Distil a text-embedding model (bi-encoder) for dense retrieval.

    Batches (from ``kdkit.datamodules.beir.BEIRDataModule``) carry tokenized text fields:
    ``text_*`` (unlabeled texts), ``query_*`` and ``passage_*`` (``[B * G, L]``: per query its
    positive then its hard negatives), each with ``<field>_input_ids`` / ``_attention_mask`` and
    ``<field>_pool`` (the text's row in the pool of static training texts), plus ``index``.

    Outputs: ``features["text" | "query" | "passage"]`` = embeddings ``[B, D]`` (passages
    ``[B, G, D]``); ``embedding`` = the text embeddings, else the query embeddings.
    The teacher's outputs are rows of a table it computes once in ``setup`` (its embeddings of
    every static training text, ``kdkit.tasks.retrieval_table``; cached on disk by its weight
    fingerprint), read through a ``PrecomputedTeacher``: training never runs the teacher. The
    datamodule runs no model: it gets the student's tokenizer and the mined hard negatives.

    Several teachers (``teachers: {bi: minilm, maxsim: minilm_maxsim}``; each distiller reads
    the one it names) may mix bi-encoders and pair scorers (``kdkit.models.scorers``): a scorer
    gives ``features["scores"]`` ``[B, G]`` from a table of its scores of every (train query,
    positive or candidate) pair, computed before training; who mines the negatives, RocketQA
    denoising and the asymmetric index: ``kdkit.tasks.retrieval_teachers``.

    Task loss (stages without distillers: the baseline): InfoNCE over in-batch and hard
    negatives (Karpukhin et al. 2020, DPR), gathered across ranks:
    ``L = -log exp(s(q_i, p_i^+)/tau) / sum_j exp(s(q_i, p_j)/tau)``.

    Evaluation encodes the whole corpus and the split's queries through the test loop (sharded
    across ranks, gathered), searches exactly and scores with ranx: ``ndcg@10``,
    ``recall@100``, ``mrr@10`` (student queries / student corpus) and ``asym/...`` (student
    queries / the teacher's corpus index, LEAF's asymmetric mode).

    Args:
        student, teacher: ``kdkit.models.text.TextEncoder`` s (a teacher may be a scorer).
        temperature: tau of the InfoNCE task loss.
        asymmetric: also evaluate student queries against the teacher's corpus embeddings.
        metrics: ranx metric names.
        search_backend: "torch" (matrix product) or "faiss" (IndexFlatIP); both exact.
        throughput_passages: corpus passages encoded per throughput measurement.
        throughput_batch_size: batch size of that measurement.
        throughput_repeats: timed rounds (teacher and student alternate; medians reported).
        eval_dims: also evaluate with query and corpus embeddings cut to their first d
            coordinates and re-normalised, as ``<metric>@d<d>`` for each d narrower than the
            model (``kdkit.tasks.retrieval_dims``; Matryoshka students, truncated teachers).
        eval_exits: also evaluate the student cut after each of these blocks (0-based), as
            ``<metric>@exit<k>`` (``kdkit.tasks.retrieval_exits``; multi-exit students).
        export_exits: also export the student cut after each of these blocks, as
            ``export/exit<k>/`` sentence-transformers folders.
        negatives_from: the bi-encoder teacher whose ranking gives the hard negatives (None: the
            first bi-encoder teacher; with scorer teachers only, the student's initial ranking).
        denoise_threshold: RocketQA denoising: drop a mined negative n when s(q, n) -
            max s(q, p+) > threshold, s the first scorer teacher's score (else the mining
            bi-encoder's); None: off (``kdkit.tasks.retrieval_teachers``).
        **kwargs: see ``DistillationTask`` (``task_loss_weight`` defaults to 0 here: the
            InfoNCE term joins the distillers only when asked; stages without distillers use 1).
    """

    primary_metric = "ndcg@10"  # compared across stages on validation data (warn_weaker_teachers)
    default_task_loss_weight = 0.0  # with distillers: distillation only unless asked

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, *, temperature: float = 0.05,
                 asymmetric: bool = True, metrics=DEFAULT_METRICS, search_backend: str = "torch",
                 throughput_passages: int = 64, throughput_batch_size: int = 32, throughput_repeats: int = 3,
                 eval_exits=None, export_exits=None, eval_dims=None, negatives_from: str | None = None,
                 denoise_threshold: float | None = None, **kwargs):
        for key in ("student_normalize", "teacher_normalize"):
            if kwargs.get(key):
                raise KdkitError(f"{key} is an image option; text encoders normalise nothing")
        super().__init__(student, teacher, **kwargs)
        check_options(self._teacher_models(), negatives_from)
        self.negatives_from, self.denoise_threshold = negatives_from, denoise_threshold
        self.denoised: int | None = None  # candidates dropped by denoising (setup)
        self.temperature = float(temperature)
        self.asymmetric = asymmetric
        self.metric_names = list(metrics)
        self.search_backend = search_backend
        self.throughput = (int(throughput_passages), int(throughput_batch_size), int(throughput_repeats))
        self.eval_dims = check_eval_dims(eval_dims)
        self._table: Tensor | None = None  # [N_pool, D] the teacher's embeddings of the pool texts
        self._teacher_index: Tensor | None = None  # [N_docs, D] its corpus index (own length)
        self._embeddings: EmbeddingCache | None = None  # the data's embedding cache (setup)
        self._eval: dict[str, list] = {"val": [], "test": []}
        self._known_corpus: dict[str, Tensor | None] = {"val": None, "test": None}
        self._fitted = False
        self._exit_eval, self.export_exits = exit_options(self, eval_exits, export_exits)

    # ---- binding to the data --------------------------------------------------------------------
    def _datamodule(self) -> RetrievalData:
        dm = self._trainer.datamodule if self._trainer is not None else None
        if not isinstance(dm, RetrievalData):
            raise KdkitError("RetrievalTask needs a retrieval datamodule (e.g. data=scifact)")
        return dm

    def setup(self, stage: str) -> None:
        """Tokenise batches for the student; with a teacher, compute (or read from the cache) its
        table and corpus index, read its outputs from the table, and hand its mined hard
        negatives to the datamodule."""
        dm = self._datamodule()
        dm.use_tokenizer(self.student.tokenizer, self.student.max_length)
        pool = dm.static_pool()
        self._embeddings = EmbeddingCache(pool.cache_dir, pool.batch_size)
        self._table = self._teacher_index = None
        negatives = None
        if self.teachers:  # bi-encoders: embedding tables; scorers: pair-score tables
            plan = prepare_teachers(self._teacher_models(), self.student, pool, self._live_source,
                                    self.negatives_from, self.denoise_threshold, getattr(dm, "num_negatives", 0))
            self._teacher_index, negatives, self.denoised = plan.index, plan.negatives, plan.dropped
            self.teacher_sources.update(plan.sources)
            bi = split_teachers(self._teacher_models())[0]
            self._table = plan.sources[bi[0]].table if len(self.teachers) == 1 and bi else None
            for name in bi:
                if self._layer_names(name):  # per-layer features: the table holds final embeddings only
                    self.teacher_sources[name] = self._live_source(name)
        dm.use_negatives(negatives)
        super().setup(stage)

    def probe(self, datamodule) -> None:
        """As the base class, with batches tokenised for this student (bi-encoder teachers
        forward live, scorer teachers score the batch's texts: their tables are computed when
        their stage sets up)."""
        from kdkit.models.scorers import is_scorer
        from kdkit.models.text import tokenizer_identity
        from kdkit.tasks.retrieval_scores import ScorerOnTexts

        datamodule.use_tokenizer(self.student.tokenizer, self.student.max_length)
        datamodule.use_negatives(None)
        for name, model in self._teacher_models().items():
            if is_scorer(model):
                texts = lambda: [t for kind in datamodule.static_pool().texts.values() for t in kind]  # noqa: E731
                self.teacher_sources[name] = ScorerOnTexts(name, model, texts)
            elif tokenizer_identity(self.student.tokenizer) != tokenizer_identity(model.tokenizer):
                return  # the teacher reads its own tokens only through the table its stage computes
        super().probe(datamodule)

    def _teacher_models(self) -> dict[str, nn.Module]:
        return {name: t.model for name, t in self.teachers.items()}

    def _live_source(self, name: str) -> TeacherSource:
        """Bi-encoder teacher ``name`` run live, where it reads the student's tokens."""
        return _SameTokens(self, super().make_teacher_source(name, None))

    def _bi_teacher(self) -> nn.Module | None:
        """The bi-encoder teacher the student is compared with (the mining one, else the first)."""
        bi = split_teachers(self._teacher_models())[0]
        name = self.negatives_from if self.negatives_from in bi else (bi[0] if bi else None)
        return self.teachers[name].model if name else None

    def on_train_start(self) -> None:
        self._fitted = True  # trained weights: not worth caching the corpus encoding

    # ---- outputs ------------------------------------------------------------------------------
    def _feature_names(self, role: str) -> list[str]:
        return split(super()._feature_names(role))[0]  # per-layer features are no modules to tap

    def _layer_names(self, role: str) -> list[str]:
        """The per-layer features (``kdkit.tasks.retrieval_layers``) the distillers read from ``role``."""
        return split(super()._feature_names(role))[1]

    def forward_outputs(self, model, batch: dict, role: str) -> Outputs:
        wanted = self._layer_names(role)
        if wanted:
            return layer_outputs(model, batch, requests(wanted, model.num_layers, role))
        feats = {f: model(batch[f"{f}_input_ids"], batch[f"{f}_attention_mask"])
                 for f in FIELDS if f"{f}_input_ids" in batch}
        return _outputs(feats)

    def task_loss(self, outputs: Outputs, batch: dict) -> Tensor:
        q, p = outputs.features.get("query"), outputs.features.get("passage")
        if q is None or p is None:
            raise KdkitError("the retrieval task loss needs (query, passages) tuples: data.stream=tuples or both")
        return info_nce(q, p, self.temperature)

    # ---- evaluation ---------------------------------------------------------------------------
    def _start_eval(self, stage: str) -> None:
        self._eval[stage] = []
        dm = self._datamodule()
        self._known_corpus[stage] = self._embedding_cache().load(self.student, "corpus", dm.eval_max_length)
        if self._exit_eval is not None:  # every exit needs the corpus encoded
            self._known_corpus[stage] = None
            self._exit_eval.start(stage)

    def _embedding_cache(self) -> EmbeddingCache:
        if self._embeddings is None:
            self._embeddings = EmbeddingCache(self._datamodule().static_pool().cache_dir)
        return self._embeddings

    def on_validation_epoch_start(self) -> None:
        self._start_eval("val")

    def on_test_epoch_start(self) -> None:
        self._start_eval("test")

    def eval_step(self, stage: str, batch: dict) -> None:
        keep = batch["is_query"] if self._known_corpus[stage] is not None else torch.ones_like(batch["is_query"])
        if not keep.any():
            return  # corpus rows already known for these exact weights (embedding cache)
        if self._exit_eval is not None:
            emb = self._exit_eval.encode(stage, self._student_forward, batch["index"][keep],
                                         batch["text_input_ids"][keep], batch["text_attention_mask"][keep])
        else:
            emb = self._student_forward(batch["text_input_ids"][keep], batch["text_attention_mask"][keep])
        self._eval[stage].append((batch["index"][keep].cpu(), emb.float().cpu()))

    def compute_metrics(self, stage: str) -> dict[str, Tensor]:
        dm = self._datamodule()
        doc_ids, query_ids, qrels = dm.eval_layout(stage)
        n_docs = len(doc_ids)
        index, emb = _gather_rows(self._eval[stage])
        self._eval[stage] = []
        dim = emb.shape[1] if len(emb) else self.student.dim
        rows = torch.zeros(n_docs + len(query_ids), dim)
        seen = torch.zeros(n_docs + len(query_ids), dtype=torch.bool)
        rows[index], seen[index] = emb, True
        known = self._known_corpus[stage]
        if known is not None:
            rows[:n_docs], seen[:n_docs] = known, True
        elif seen[:n_docs].all() and not self._fitted and world()[0] == 0:
            self._embedding_cache().store(self.student, "corpus", rows[:n_docs], dm.eval_max_length)
        docs = seen[:n_docs].nonzero().squeeze(1)
        queries = seen[n_docs:].nonzero().squeeze(1)
        if len(docs) < n_docs or len(queries) < len(query_ids):
            rank_zero_warn(f"partial {stage} evaluation: {len(docs)}/{n_docs} passages and "
                           f"{len(queries)}/{len(query_ids)} queries encoded (limit_{stage}_batches?)")
        if not len(docs) or not len(queries):
            return {}
        q_ids = [query_ids[i] for i in queries.tolist()]
        d_ids = [doc_ids[i] for i in docs.tolist()]
        q_qrels = {q: qrels[q] for q in q_ids}
        q_emb = rows[n_docs + queries]
        out = retrieval_metrics(q_emb, rows[docs], q_ids, d_ids, q_qrels, self.metric_names, self.search_backend)
        out.update(truncated_metrics(q_emb, rows[docs], q_ids, d_ids, q_qrels, self.eval_dims, self.metric_names,
                                     self.search_backend))
        if self.asymmetric and self._teacher_index is not None:
            teacher_docs = self._teacher_index.float().cpu()[docs]
            if teacher_docs.shape[1] == q_emb.shape[1]:
                asym = retrieval_metrics(q_emb, teacher_docs, q_ids, d_ids, q_qrels, self.metric_names,
                                         self.search_backend)
                out.update({f"asym/{k}": v for k, v in asym.items()})
        if self._exit_eval is not None:
            out.update(self._exit_eval.metrics(stage, doc_ids, query_ids, qrels))
        return {k: torch.tensor(v) for k, v in out.items()}

    # ---- report and export --------------------------------------------------------------------
    @torch.inference_mode()
    def inference_report(self, batch: dict) -> dict:
        """Sizes, and encode throughput (passages/s) of student and teacher side by side.

        Both encode the same corpus passages at their own max length with the same batch size;
        rounds alternate between the models so load changes hit all alike. With ``eval_exits``,
        the student cut at each exit (the model ``export_exits`` would ship) runs in the same
        rounds: ``passages_per_s@exit<k>`` and ``speedup@exit<k>``.
        """
        from kdkit.models.text_layers import cut_at_exit

        n, batch_size, repeats = self.throughput
        dm = self._datamodule()
        texts = dm.passage_texts(n)
        models = {"student": self.student}
        if self._exit_eval is not None:
            models.update({f"exit{k}": cut_at_exit(self.student, k).eval() for k in self._exit_eval.exits})
        teacher = self._bi_teacher()
        if teacher is not None:
            models["teacher"] = teacher
        inputs = {name: [m.tokenize(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
                  for name, m in models.items()}
        timings: dict[str, list[float]] = {name: [] for name in models}
        was_training = self.student.training
        self.student.eval()
        for _ in range(repeats + 1):  # the first round warms up
            for name, model in models.items():
                start = time.perf_counter()
                for enc in inputs[name]:
                    model(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))
                timings[name].append(time.perf_counter() - start)
        self.student.train(was_training)
        rate = {name: len(texts) / statistics.median(t[1:]) for name, t in timings.items()}
        report = {"params": sum(p.numel() for p in self.student.parameters()),
                  "layers": self.student.num_layers, "dim": self.student.dim,
                  "max_length": self.student.max_length, "passages_per_s": rate["student"]}
        if self.denoised is not None:
            report["denoised_negatives"] = self.denoised
        cuts = [name for name in models if name.startswith("exit")]
        report.update({f"passages_per_s@{name}": rate[name] for name in cuts})
        if "teacher" in rate:
            report.update({"teacher_params": sum(p.numel() for p in teacher.parameters()),
                           "teacher_passages_per_s": rate["teacher"],
                           "speedup": rate["student"] / rate["teacher"]})
            report.update({f"speedup@{name}": rate[name] / rate["teacher"] for name in cuts})
        return report

    def export(self, directory, with_adapters: bool = False) -> list[Path]:
        """Save the student as a transformers + sentence-transformers folder (see
        ``TextEncoder.save_pretrained`` and ``kdkit.exports``); distiller adapters in
        ``adapters.pt`` only if asked."""
        directory = Path(self.student.save_pretrained(directory))
        paths = [directory]
        if self.export_exits:
            paths += save_exits(self.student, directory, self.export_exits)
        if with_adapters and len(self.distillers):
            paths.append(directory / "adapters.pt")
            torch.save(self.distillers.state_dict(), paths[-1])
        return paths


class _SameTokens(TeacherSource):
    """The live teacher, only where it reads the student's tokens (batches are tokenised once)."""

    def __init__(self, task: RetrievalTask, live: TeacherSource):
        self.name, self.task, self.live = live.name, task, live
        self._same: bool | None = None  # tokenizers never change: hash them once, not every step

    def outputs(self, batch: dict) -> Outputs:
        from kdkit.models.text import tokenizer_identity

        if self._same is None:
            teacher = self.task.teachers[self.name].model
            self._same = tokenizer_identity(self.task.student.tokenizer) == tokenizer_identity(teacher.tokenizer)
        if not self._same:
            raise KdkitError("teacher and student tokenizers differ and the batch has no teacher-table "
                             "rows (*_pool indices): the teacher cannot read the student's tokens")
        return self.live.outputs(batch)


def exit_options(task: RetrievalTask, eval_exits, export_exits):
    """The task's ``ExitEvaluation`` (None without ``eval_exits``) and export exits, checked
    against the student; and, when a distiller reads a teacher's per-layer embeddings, the
    check that the teacher can run live on the student's tokens (its table has final
    embeddings only)."""
    from kdkit.models.text import tokenizer_identity

    evaluation = None
    if eval_exits:
        evaluation = ExitEvaluation(check_exits(eval_exits, task.student.num_layers, "eval_exits"),
                                    task.metric_names, task.search_backend)
    for name, teacher in task.teachers.items():
        wanted = task._layer_names(name)
        if not wanted:
            continue
        tokenizer = getattr(teacher.model, "tokenizer", None)
        if tokenizer is None or tokenizer_identity(tokenizer) != tokenizer_identity(task.student.tokenizer):
            raise KdkitError(f"distillers read the teacher's per-layer embeddings ({', '.join(wanted)}): the "
                             "teacher must run live on the student's tokens, but their tokenizers differ "
                             "(use a student with the teacher's tokenizer, e.g. student=minilm_layers)")
    if export_exits:
        export_exits = check_exits(export_exits, task.student.num_layers, "export_exits")
    return evaluation, list(export_exits or []) or None


def info_nce(query: Tensor, passages: Tensor, temperature: float) -> Tensor:
    """InfoNCE of ``query [B, D]`` over every passage of the (global) batch, ``passages
    [B, G, D]`` with the positive at group position 0."""
    b, g, d = passages.shape
    every, offset = gather(passages.reshape(b * g, d))
    scores = query.float() @ every.float().T / temperature
    target = offset + torch.arange(b, device=query.device) * g
    return F.cross_entropy(scores, target)


def _gather_rows(parts: list) -> tuple[Tensor, Tensor]:
    """Concatenate ``(index, embedding)`` pieces of every rank (ranks may hold different counts)."""
    index = torch.cat([p[0] for p in parts]) if parts else torch.empty(0, dtype=torch.long)
    emb = torch.cat([p[1] for p in parts]) if parts else torch.empty(0, 0)
    _, size = world()
    if size > 1:
        every = [None] * size
        dist.all_gather_object(every, (index, emb))
        index = torch.cat([e[0] for e in every])
        emb = torch.cat([e[1] for e in every if e[1].numel()] or [emb])
    return index, emb
