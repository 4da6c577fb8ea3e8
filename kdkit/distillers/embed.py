"""Embedding distillation into the teacher's space (LEAF)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.distillers.base import Distiller, check_same_shape
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

LOSSES = ("cosine", "mse")
FIELDS = ("text", "query", "passage")


def embedding_loss(student: Tensor, teacher: Tensor, kind: str = "cosine") -> Tensor:
    """Distance between paired rows ``[N, D]``, averaged over rows, in float32.

    ``cosine``: ``mean_i 1 - cos(s_i, t_i)``; ``mse``: ``mean_i ||s_i - t_i||_2^2``. For unit
    vectors ``||s - t||^2 = 2 (1 - cos)``, so the two differ by a factor 2 on normalised models;
    ``mse`` also matches the norm when embeddings are not normalised.
    """
    s, t = student.float(), teacher.float()
    if kind == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    if kind == "mse":
        return (s - t).pow(2).sum(-1).mean()
    raise KdkitError(f"embed.loss={kind!r}: use one of {', '.join(LOSSES)}")


def check_fields(fields: Sequence[str] | None, who: str) -> list[str] | None:
    """``fields`` as a list (None: every field a batch has), refusing names outside ``FIELDS``."""
    bad = [f for f in fields or () if f not in FIELDS]
    if bad:
        raise KdkitError(f"{who}.fields {bad} unknown: use some of {', '.join(FIELDS)}")
    return list(fields) if fields else None


def text_fields(student: Outputs, teacher: Outputs, fields: list[str] | None, who: str) -> list[str]:
    """The text fields both models embedded for this batch: ``fields``, or all the batch has."""
    names = fields or [f for f in FIELDS if f in student.features]
    missing = [f for f in names if f not in student.features or f not in teacher.features]
    if missing or not names:
        raise KdkitError(f"{who} needs text fields {missing or list(FIELDS)} that this batch lacks")
    return names


def field_rows(outputs: Outputs, names: list[str]) -> Tensor:
    """Every embedding of ``names`` as rows ``[N, D]``, fields in order (passages flattened)."""
    return torch.cat([outputs.features[f].reshape(-1, outputs.features[f].shape[-1]) for f in names])


class Embed(Distiller):
    """Teacher-aligned embedding distillation (Vujanic & Rueckstiess 2025, "LEAF: Knowledge
    Distillation of Text Embedding Models with Teacher-Aligned Representations").

        L = (1/N) sum_x d(f_s(x), f_t(x)),   d = 1 - cos  or  ||.||_2^2

    over every text x of the batch (unlabeled texts, queries, passages): the student learns to
    put each text where the teacher puts it, so its queries can search a teacher-built index
    (asymmetric mode). Needs no labels and no negatives. Returns ``"loss"``.

    Widths: student and teacher must match (give the student ``projection_dim`` = the teacher's
    width), unless ``project``: then a compact student (e.g. 128-d embeddings from a 384-wide
    teacher) is compared through a learned linear map up to the teacher's width, used only by this
    loss, ``L = (1/N) sum_x d(W f_s(x) + b, f_t(x))``, as LEALLA's feature distillation (Mao &
    Nakagawa 2023, "LEALLA: Learning Lightweight Language-agnostic Sentence Embeddings with
    Knowledge Distillation": a fully connected layer maps the low-dimensional student embedding to
    the teacher's dimension for an MSE to the teacher's embedding). The map trains with the
    student and is an adapter: the student exports and searches with its own low-dimensional
    embeddings (no asymmetric mode: the spaces differ). Pair it with a score distiller
    (``margin_mse``, ``listwise``: scores are computed within each model, at any width) for
    LEALLA's logit distillation.

    Args:
        weight: multiplier of the loss.
        loss: "cosine" or "mse".
        fields: which text fields to align (None: every one the batch has among text, query,
            passage).
        project: when the widths differ, learn ``W: D_s -> D_t`` for the loss (False: widths
            must match). With equal widths nothing is built.
    """

    def __init__(self, weight: float = 1.0, loss: str = "cosine", fields: Sequence[str] | None = None,
                 project: bool = False):
        super().__init__(weight)
        if loss not in LOSSES:
            raise KdkitError(f"embed.loss={loss!r}: use one of {', '.join(LOSSES)}")
        self.loss = loss
        self.fields = check_fields(fields, "embed")
        self.project = bool(project)
        self.projection: nn.Linear | None = None

    def _rows(self, student: Outputs, teacher: Outputs) -> tuple[Tensor, Tensor]:
        names = text_fields(student, teacher, self.fields, "embed")
        return field_rows(student, names), field_rows(teacher, names)

    def _pairs(self, student: Outputs, teacher: Outputs) -> tuple[Tensor, Tensor]:
        s, t = self._rows(student, teacher)
        if self.projection is not None:
            s = self.projection(s)
        check_same_shape(s, t, "embed", " (set the student's projection_dim to the teacher's width, "
                                        "or embed.project=true to compare through a learned projection)")
        return s, t

    def build(self, student: Outputs, teacher: Outputs, context) -> None:
        s, t = self._rows(student, teacher)
        if self.project and s.shape[-1] != t.shape[-1] and self.projection is None:
            self.projection = nn.Linear(s.shape[-1], t.shape[-1])
        self._pairs(student, teacher)

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        s, t = self._pairs(student, teacher)
        return {"loss": embedding_loss(s, t, self.loss)}

    def extra_repr(self) -> str:
        return f"weight={self.weight}, loss={self.loss}, fields={self.fields}, project={self.project}"
