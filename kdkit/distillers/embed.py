"""Embedding distillation into the teacher's space (LEAF)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

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


class Embed(Distiller):
    """Teacher-aligned embedding distillation (Vujanic & Rueckstiess 2025, "LEAF: Knowledge
    Distillation of Text Embedding Models with Teacher-Aligned Representations").

        L = (1/N) sum_x d(f_s(x), f_t(x)),   d = 1 - cos  or  ||.||_2^2

    over every text x of the batch (unlabeled texts, queries, passages): the student learns to
    put each text where the teacher puts it, so its queries can search a teacher-built index
    (asymmetric mode). Needs no labels and no negatives. Student and teacher widths must match
    (give the student ``projection_dim`` = the teacher's width otherwise). Returns ``"loss"``.

    Args:
        weight: multiplier of the loss.
        loss: "cosine" or "mse".
        fields: which text fields to align (None: every one the batch has among text, query,
            passage).
    """

    def __init__(self, weight: float = 1.0, loss: str = "cosine", fields: Sequence[str] | None = None):
        super().__init__(weight)
        if loss not in LOSSES:
            raise KdkitError(f"embed.loss={loss!r}: use one of {', '.join(LOSSES)}")
        bad = [f for f in fields or () if f not in FIELDS]
        if bad:
            raise KdkitError(f"embed.fields {bad} unknown: use some of {', '.join(FIELDS)}")
        self.loss = loss
        self.fields = list(fields) if fields else None

    def _pairs(self, student: Outputs, teacher: Outputs) -> tuple[Tensor, Tensor]:
        names = self.fields or [f for f in FIELDS if f in student.features]
        missing = [f for f in names if f not in student.features or f not in teacher.features]
        if missing or not names:
            raise KdkitError(f"embed needs text fields {missing or list(FIELDS)} that this batch lacks")
        s = [student.features[f].reshape(-1, student.features[f].shape[-1]) for f in names]
        t = [teacher.features[f].reshape(-1, teacher.features[f].shape[-1]) for f in names]
        return torch.cat(s), torch.cat(t)

    def build(self, student: Outputs, teacher: Outputs, context) -> None:
        s, t = self._pairs(student, teacher)
        check_same_shape(s, t, "embed", " (set the student's projection_dim to the teacher's width)")

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        s, t = self._pairs(student, teacher)
        check_same_shape(s, t, "embed", " (set the student's projection_dim to the teacher's width)")
        return {"loss": embedding_loss(s, t, self.loss)}

    def extra_repr(self) -> str:
        return f"weight={self.weight}, loss={self.loss}, fields={self.fields}"
