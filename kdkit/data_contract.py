"""The data contract: what kdkit's core reads from a datamodule, written down once.

Every datamodule is a ``LightningDataModule`` (Lightning's own contract: ``prepare_data``,
``setup``, the loaders) that also implements one of the protocols below, *explicitly*: it lists
the protocol among its bases (``class GraphDataModule(L.LightningDataModule, GraphData)``), so
the setting it serves is stated in the code and ``tests/test_data_contract.py`` checks that every
member is really there. The core then reads these members directly, without ``getattr`` /
``hasattr`` fallbacks or signature inspection.

Rules for an implementation:

- Every member is visible on the class: a method, a property, or a class-level default (an
  instance attribute assigned only in ``__init__`` does not count: the protocol's stub would
  answer ``None`` for it). Inheriting a protocol gives a class the stubs below, which do nothing
  and return ``None``; the test refuses a member that only a protocol provides.
- Read-only members are properties here; an implementation may use a plain attribute instead.
- Members are read after ``setup("fit")`` (the pipeline calls ``prepare_data`` and ``setup``
  first); a datamodule may set itself up lazily when one is read earlier.
- A datamodule loads data; it never runs a model. What a model computes from the data (a
  teacher's embedding table, negatives mined from its ranking) is computed by the task and
  handed back as data through an explicit method (``RetrievalData.use_negatives``).

Settings (one protocol each, all extending ``DistillationData``):

- ``ClassificationData``: labelled images (``DigitsDataModule``, ``CIFAR10DataModule``,
  ``ImageFolderDataModule``).
- ``ImageTextData``: image-caption pairs for CLIP (``CIFAR10PairsDataModule``,
  ``CSVPairsDataModule``, ``WebDatasetPairsDataModule``).
- ``RetrievalData``: a corpus, queries and qrels, with the static training texts a task embeds
  with its teacher once (``BEIRDataModule``).
- ``GraphData``: one graph, node classification (``GraphDataModule``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class DistillationData(Protocol):
    """What every datamodule provides, whatever its setting."""

    def example_batch(self, n: int | None = None) -> dict[str, Any]:
        """A small deterministic batch in the training schema (no augmentation; ``n`` samples,
        None: the datamodule's default); read by ``DistillationTask.probe``/``setup`` and the
        pipeline's latency measurement (``report.latency_batch_size``)."""

    @property
    def num_train_samples(self) -> int | None:
        """Size of the training index space (train ``batch["index"]`` lies in ``[0, n)``), None
        if unknown; read by ``DistillationTask.build`` (``DistillContext.num_samples``, CRD's
        memory bank) and ``kdkit.cache.build_teacher_cache`` (the cache's rows)."""

    @property
    def num_classes(self) -> int | None:
        """Number of label classes, None when the data has no class labels; read by
        ``DistillationTask.build`` (``DistillContext.num_classes``) and ``kdkit.data_facts``
        (fills a null ``data.num_classes``)."""

    @property
    def static_for_teacher(self) -> bool:
        """True when a training sample reaches the teacher unchanged every epoch (no random
        augmentation or caption draw), so its outputs may be cached by index; read by
        ``kdkit.cache.build_teacher_cache``, which refuses ``teacher.cache`` otherwise."""

    @property
    def teacher_input_fingerprint(self) -> str | None:
        """A string that changes whenever the teacher's training inputs change (samples or
        preprocessing), None: the data config stands for them; read by
        ``kdkit.cache.describe_teacher_input`` (the key of the teacher cache)."""

    @property
    def fixed_shards(self) -> bool:
        """Whether the training loader keeps every DDP rank on a fixed shard
        (``kdkit.distributed.FixedShardSampler``); False until ``use_fixed_shards()``; read by
        the datamodule's own train loader (``kdkit.datamodules.base.build_loader``)."""

    def use_fixed_shards(self) -> None:
        """Serve fixed per-rank training shards from now on (``fixed_shards`` becomes True), or
        raise KdkitError when the loader cannot; called by ``kdkit.cache.build_teacher_cache``
        so that under DDP each rank's teacher cache is complete after one epoch."""


@runtime_checkable
class ClassificationData(DistillationData, Protocol):
    """Labelled images: batches ``{"image": float [B, C, H, W] in [0, 1], "label", "index"}``."""

    @property
    def num_classes(self) -> int:
        """Number of classes (labels lie in ``[0, num_classes)``), never None; read as in
        ``DistillationData`` and checked against ``data.num_classes`` at setup."""

    @property
    def is_transfer(self) -> bool:
        """Whether some training samples have no label (``kdkit.datamodules.transfer``): the
        baseline and the student then train on different views; read by the pipeline."""

    @property
    def teacher_view(self) -> str:
        """The training view of the teacher's own stage (``all`` or ``labeled``); read by
        ``kdkit.stage_views``."""

    @property
    def student_view(self) -> str:
        """The training view of the distilled student's stage (``transfer`` or ``labeled``);
        read by ``kdkit.stage_views``."""

    @property
    def has_unlabeled(self) -> bool:
        """Whether the current training view holds samples without a label
        (``label = kdkit.labels.UNLABELED``); read by ``DistillationTask.build``, which refuses
        distillers that read labels on such data."""

    @property
    def mixes_samples(self) -> bool:
        """Whether training rows are mixtures of two samples with soft labels ``float [B,
        num_classes]`` (Mixup / CutMix, ``kdkit.datamodules.batch_mix``); read by
        ``ClassificationTask.check_data`` (label and sample-index readers), the selection
        policies and the teacher-labels stage, which refuse what needs one sample per row."""

    def use_train_view(self, view: str) -> None:
        """Serve training view ``view`` (``all``, ``labeled`` or ``transfer``,
        ``kdkit.datamodules.transfer``) from now on; called by the pipeline before each stage."""

    @property
    def plain_train_view(self) -> Any:
        """The current training view without augmentation (a Dataset of dict samples indexed
        like its batches); read by selection policies that score the whole pool
        (``kdkit.selection``) and by the teacher-labels writer."""


@runtime_checkable
class ImageTextData(DistillationData, Protocol):
    """Image-caption pairs: batches ``{"image", "text", "index", "pair_id"}`` (+ ``"label"``)."""

    @property
    def tokenizer(self) -> Callable[[list[str]], Tensor] | None:
        """Captions -> ``[N, L]`` token ids; read by ``ImageTextTask`` for the zero-shot prompts
        when ``task.tokenizer`` is unset."""

    @property
    def class_names(self) -> Sequence[str] | None:
        """Class names in label order, None without labels; read by ``ImageTextTask`` for
        zero-shot accuracy when ``task.class_names`` is unset."""

    @property
    def templates(self) -> Sequence[str] | None:
        """Zero-shot prompt templates with one ``{}``, None: the task's default; read by
        ``ImageTextTask`` when ``task.templates`` is unset."""


@dataclass(frozen=True)
class StaticPool:
    """The static training texts of a retrieval dataset: the rows the ``*_pool`` indices of its
    batches address, and what a teacher-table builder needs to embed them (data only; the
    builder, ``kdkit.tasks.retrieval_table.build_teacher_table``, runs the teacher).

    Args:
        texts: text set name (``kind``) -> texts, in pool order: pool row ``i`` is the ``i``-th
            text of their concatenation. ``corpus_kind`` and ``query_kind`` are among them.
        positives: per train query (the order of ``texts[query_kind]``), its relevant corpus rows.
        negative_ranks: ``(lo, hi)``: ranks of the teacher's ranking (positives removed) that
            hard negatives come from; None when the training stream has no tuples.
        target_max_length: tokens per text of the teacher's targets (None: its own length).
        cache_dir: a folder for files derived from exactly this data (its fingerprint is in the
            name), e.g. cached embeddings of ``texts``.
        batch_size: batch size of the one-off teacher encoding.
        corpus_kind, query_kind: the names of the corpus and train-query sets in ``texts``.
    """

    texts: dict[str, list[str]]
    positives: list[set[int]]
    negative_ranks: tuple[int, int] | None
    target_max_length: int | None
    cache_dir: Path
    batch_size: int = 64
    corpus_kind: str = "corpus"
    query_kind: str = "queries-train"


@runtime_checkable
class RetrievalData(DistillationData, Protocol):
    """A corpus, queries and qrels (BEIR); batches of tokenized texts whose ``*_pool`` indices
    address the static training texts (``static_pool``). The datamodule runs no model: the task
    embeds the pool with its teacher and hands back only data (tokenizer, negatives)."""

    def use_tokenizer(self, tokenizer, max_length: int | None = None) -> None:
        """Tokenize batches with ``tokenizer`` from now on; ``max_length`` (the model's own)
        becomes ``eval_max_length`` unless the data config sets one; called by
        ``RetrievalTask.setup`` and ``RetrievalTask.probe`` with the student's."""

    def static_pool(self) -> StaticPool:
        """The static training texts in pool order, with what the teacher-table builder needs;
        read by ``RetrievalTask.setup`` (``kdkit.tasks.retrieval_table.build_teacher_table``;
        its ``cache_dir`` also holds the student's cached corpus encoding)."""

    def use_negatives(self, negatives: Sequence[Sequence[int]] | None) -> None:
        """Draw the tuple streams' negatives from ``negatives`` (per train query, corpus rows:
        a sequence of ints or a 1-D index tensor), None: random non-positive passages; called
        by ``RetrievalTask.setup`` with the teacher's mined hard negatives."""

    @property
    def eval_max_length(self) -> int | None:
        """Tokens per evaluated text, None until a tokenizer is given; read by
        ``RetrievalTask`` as the length of its cached corpus embeddings."""

    def eval_layout(self, stage: str) -> tuple[list[str], list[str], dict[str, dict[str, int]]]:
        """``(doc_ids, query_ids, qrels)`` behind the eval stream's indices of ``stage``; read
        by ``RetrievalTask.compute_metrics``."""

    def passage_texts(self, n: int) -> list[str]:
        """``n`` corpus passages drawn with the seed; read by ``RetrievalTask.inference_report``
        (encode throughput)."""


@runtime_checkable
class GraphData(DistillationData, Protocol):
    """One graph, node classification: every batch is a whole graph (``x``, ``edge_index``,
    ``y``, masks, ``index``)."""

    @property
    def num_classes(self) -> int:
        """Number of node classes, never None; read as in ``DistillationData``."""

    @property
    def num_features(self) -> int:
        """Node feature width (``x.shape[1]``); read by ``kdkit.data_facts`` (fills a null
        ``data.num_features``, the models' ``in_channels``)."""


SETTINGS: tuple[type, ...] = (DistillationData, ClassificationData, ImageTextData, RetrievalData,
                              GraphData)


def members(protocol: type) -> list[str]:
    """The member names of ``protocol`` (one of ``SETTINGS``), its base protocols' included."""
    names: dict[str, None] = {}
    for klass in reversed(protocol.__mro__):
        if klass in SETTINGS:
            names.update(dict.fromkeys(n for n in vars(klass) if not n.startswith("_")))
    return list(names)


def settings_of(cls: type) -> list[type]:
    """The protocols of ``SETTINGS`` that ``cls`` declares among its bases (directly or not)."""
    return [p for p in SETTINGS if p in cls.__mro__]
