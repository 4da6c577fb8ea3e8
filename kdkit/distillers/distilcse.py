"""Contrastive knowledge distillation (CKD) of sentence embeddings: InfoNCE against the teacher's."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.distillers.base import Distiller
from kdkit.distillers.embed import check_fields, embedding_loss, field_rows, text_fields
from kdkit.distributed import gather_nograd, world
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs


def contrastive_kd(student: Tensor, keys: Tensor, positive: Tensor, scale: Tensor | float,
                   row_ids: Tensor | None = None, key_ids: Tensor | None = None) -> Tensor:
    """``mean_i -log softmax_j(scale * cos(s_i, k_j))[positive_i]`` in float32.

    ``student`` ``[N, D]``, ``keys`` ``[M, D]`` (the teacher's embeddings), ``positive`` ``[N]``
    the column of each row's own teacher embedding. With ``row_ids`` / ``key_ids`` (the texts'
    pool indices), a key of the same text as row i other than its positive (the text met twice
    in a batch or again in the queue) is no negative: it is left out of row i's softmax.
    """
    with torch.autocast(student.device.type, enabled=False):  # cosines near 1 lose digits in bf16
        logits = scale * F.normalize(student.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T
    if row_ids is not None and key_ids is not None:
        same = row_ids[:, None] == key_ids[None, :]
        same[torch.arange(len(positive), device=same.device), positive] = False
        logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits, positive)


class DistilCSE(Distiller):
    """Contrastive Knowledge Distillation, CKD (Gao et al. 2021, "DistilCSE: Effective Knowledge
    Distillation For Contrastive Sentence Embeddings", arXiv 2112.05638).

        L = -(1/N) sum_i log  exp(cos(W s_i, t_i) / tau) / sum_{j in batch + queue} exp(cos(W s_i, t_j) / tau)

    Each student embedding ``s_i`` (through a linear map ``W`` into the teacher's width when the
    widths differ) must pick its own text's teacher embedding ``t_i`` among the teacher's
    embeddings of every other text: of the global batch (gathered from all ranks, so 2 ranks
    x B give the loss of 1 process x 2B) and of a FIFO queue of earlier batches' teacher
    embeddings, as in the authors' code (``ckd_contrastive.py``: queue 65536, kdkit's default
    4096, see the yaml; learnable
    temperature ``1 / tau = exp(p)`` with ``p`` starting at 1, no MSE term by default). The
    teacher is frozen, so queued keys never go stale. Texts are every row of the batch's
    ``text`` / ``query`` / ``passage`` fields (as ``embed``). Departure from the paper: a key
    of the same text as the row (same pool index: a passage in two groups, or a text again in
    the queue) is not counted as a negative; the queue therefore needs the batch's
    ``<field>_pool`` indices, which retrieval batches carry. ``W`` and ``p`` train with the
    student and are dropped on export; the queue is not checkpointed (it refills in
    ``queue_size / batch rows`` steps). Returns ``"loss"`` (and ``"mse"`` when weighted).

    Args:
        weight: multiplier of every term.
        temperature: tau (the start value when learned; the authors' code: 1/e ~ 0.368).
        learn_temperature: learn ``log(1 / tau)`` with the student (the authors' code: yes).
        queue_size: teacher embeddings kept from earlier steps as extra negatives (0: none; the
            authors' 65536 costs ~0.9 s per CPU step at 384 dims).
        mse_weight: weight of an added ``mean_i ||W s_i - t_i||^2`` term (the authors'
            ``--mse`` option, off in their runs; 0: not computed).
        projection: map the student into the teacher's width with a learned linear layer:
            None = exactly when the widths differ, true = always (the authors' code), false = never.
        fields: text fields used (None: all the batch has among text, query, passage).
    """

    # every rank enqueues the same gathered teacher rows: DDP need not broadcast the queue
    # (65536 x 384 floats, 100 MB) before every step
    rank_synced_buffers = ("queue", "queue_ids")

    def __init__(self, weight: float = 1.0, temperature: float = math.exp(-1.0), learn_temperature: bool = True,
                 queue_size: int = 4096, mse_weight: float = 0.0, projection: bool | None = None,
                 fields: Sequence[str] | None = None):
        super().__init__(weight)
        if temperature <= 0 or queue_size < 0 or mse_weight < 0:
            raise KdkitError("distilcse: temperature must be > 0, queue_size and mse_weight >= 0")
        self.temperature = float(temperature)
        self.log_scale = nn.Parameter(torch.tensor(-math.log(temperature))) if learn_temperature else None
        self.queue_size = int(queue_size)
        self.mse_weight = float(mse_weight)
        self.projection = projection
        self.fields = check_fields(fields, "distilcse")
        self.project: nn.Module = nn.Identity()
        # earlier steps' normalised teacher rows (newest first) and their pool indices
        self.register_buffer("queue", torch.empty(0), persistent=False)
        self.register_buffer("queue_ids", torch.empty(0, dtype=torch.long), persistent=False)

    def build(self, student: Outputs, teacher: Outputs, context) -> None:
        names = text_fields(student, teacher, self.fields, "distilcse")
        d_s, d_t = student.features[names[0]].shape[-1], teacher.features[names[0]].shape[-1]
        if self.projection or (self.projection is None and d_s != d_t):
            self.project = nn.Linear(d_s, d_t)
        elif d_s != d_t:
            raise KdkitError(f"distilcse: student width {d_s} != teacher width {d_t} and "
                             "projection=false: set projection to null or true")

    def scale(self) -> Tensor | float:
        """``1 / tau``: learned, or fixed."""
        return self.log_scale.exp() if self.log_scale is not None else 1.0 / self.temperature

    def _pool_ids(self, batch: dict, names: list[str], n: int) -> Tensor | None:
        keys = [f"{f}_pool" for f in names]
        if not all(k in batch for k in keys):
            if self.queue_size:
                raise KdkitError(f"distilcse.queue_size={self.queue_size} needs the batch's pool "
                                 f"indices {keys} (a text must not be its own negative): "
                                 "set queue_size=0 for batches without them")
            return None
        ids = torch.cat([torch.as_tensor(batch[k]).reshape(-1) for k in keys]).long()
        if len(ids) != n:
            raise KdkitError(f"distilcse: {len(ids)} pool indices for {n} embedded texts")
        return ids

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        names = text_fields(student, teacher, self.fields, "distilcse")
        s = self.project(field_rows(student, names))
        t = field_rows(teacher, names).detach().float()
        if s.shape != t.shape:
            raise KdkitError(f"distilcse: student rows {tuple(s.shape)} (after projection) do not "
                             f"match teacher rows {tuple(t.shape)}")
        n = len(s)
        ids = self._pool_ids(batch, names, n)
        rank, _ = world()
        keys = F.normalize(gather_nograd(t), dim=-1)  # the same row count on every rank
        key_ids = None if ids is None else gather_nograd(ids.to(t.device))
        positive = rank * n + torch.arange(n, device=s.device)
        all_keys = torch.cat([keys, self.queue.to(keys)]) if len(self.queue) else keys
        all_ids = None if key_ids is None else torch.cat([key_ids, self.queue_ids.to(key_ids.device)])
        terms = {"loss": contrastive_kd(s, all_keys, positive, self.scale(),
                                        None if ids is None else ids.to(s.device), all_ids)}
        if self.mse_weight:
            terms["mse"] = self.mse_weight * embedding_loss(s, t, "mse")
        if self.training and self.queue_size:
            self.queue = all_keys[: self.queue_size].detach()
            self.queue_ids = all_ids[: self.queue_size]
        return terms

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, temperature={self.temperature}, "
                f"learn_temperature={self.log_scale is not None}, queue_size={self.queue_size}, "
                f"mse_weight={self.mse_weight}, fields={self.fields}")
