"""Matryoshka embedding distillation: a distillation loss at several truncated student widths."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.distillers.base import Distiller
from kdkit.distillers.embed import LOSSES, check_fields, embedding_loss, field_rows, text_fields
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

TARGETS = ("similarity", "projection", "prefix")


def truncate(embeddings: Tensor, dim: int) -> Tensor:
    """The first ``dim`` coordinates of every row, L2-normalised again (in float32)."""
    return F.normalize(embeddings[..., :dim].float(), p=2, dim=-1)


def similarity_matrix_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``mean_{i != j} (cos(s_i, s_j) - cos(t_i, t_j))^2`` over the rows of ``[N, D_s]`` and
    ``[N, D_t]`` (the widths may differ: only the cosine-similarity matrices are compared)."""
    n = student.shape[0]
    if n < 2:
        raise KdkitError("matryoshka target=similarity needs at least 2 texts in a batch")
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    with torch.autocast(s.device.type, enabled=False):  # cosines near 1 lose their differences in bf16
        diff = s @ s.T - t @ t.T
    off = ~torch.eye(n, dtype=torch.bool, device=s.device)  # the diagonal is 1 - 1 for any model
    return diff[off].pow(2).mean()


class Matryoshka(Distiller):
    """Matryoshka Representation Learning for embedding distillation (Kusupati et al., NeurIPS
    2022, "Matryoshka Representation Learning"): the first ``d`` coordinates of the student's
    embedding, re-normalised, are themselves a usable embedding for every ``d`` in ``dims``, so an
    index can keep 64 of 384 dimensions and search with the same model.

        L = sum_d w_d L_d(norm(s[:d]), t),   s[:d] = the student's first d coordinates

    The teacher's embedding keeps its full width ``D_t``; what a truncated student is compared
    with is ``target``:

    - ``similarity`` (default): ``L_d = mean_{i != j} (cos(s_i[:d], s_j[:d]) - cos(t_i, t_j))^2``
      over every text of the batch (queries, passages, unlabeled texts): the prefix must
      reproduce the teacher's full-width similarity structure, which is what retrieval with it
      reads. No parameters; any widths.
    - ``projection``: ``L_d = d(W_d s[:d] + b_d, t)`` (``loss``: 1 - cos or squared L2) through a
      learned ``Linear(d, D_t)`` per prefix (none where ``d == D_t``), LEALLA-style feature
      distillation of each prefix; the maps are adapters, never exported.
    - ``prefix``: ``L_d = d(s[:d], norm(t[:d]))``: the teacher's own first ``d`` coordinates, as
      sentence-transformers' ``MatryoshkaLoss`` around ``MSELoss`` does (it truncates the
      teacher's embedding labels to ``d``). A teacher not trained Matryoshka-style is a weak
      embedding truncated (see ``task.eval_dims``), so this copies that weakness; here for
      comparison.

    Combine with ``embed`` (``distiller=[embed,matryoshka]``) to keep the full-width student in
    the teacher's space for asymmetric search. Per-rank batches (no cross-rank gather). Returns
    ``"d<dim>"`` terms, each already multiplied by its ``dim_weights`` entry.

    Args:
        weight: multiplier of every term.
        dims: prefix widths, e.g. ``[384, 256, 128, 64]`` (each <= the student's width; with
            ``prefix`` also <= the teacher's).
        dim_weights: one weight per entry of ``dims`` (None: all 1).
        target: "similarity", "projection" or "prefix" (above).
        loss: "cosine" or "mse", the distance of ``projection`` and ``prefix``.
        fields: text fields used (None: all the batch has among text, query, passage).
    """

    def __init__(self, weight: float = 1.0, dims: Sequence[int] = (384, 256, 128, 64),
                 dim_weights: Sequence[float] | None = None, target: str = "similarity", loss: str = "cosine",
                 fields: Sequence[str] | None = None):
        super().__init__(weight)
        dims = list(dims or [])
        if not dims or any(not isinstance(d, int) or isinstance(d, bool) or d <= 0 for d in dims) \
                or len(set(dims)) != len(dims):
            raise KdkitError(f"matryoshka.dims={dims}: give distinct positive integers, e.g. [384, 256, 128, 64]")
        weights = [1.0] * len(dims) if dim_weights is None else [float(w) for w in dim_weights]
        if len(weights) != len(dims):
            raise KdkitError(f"matryoshka.dim_weights has {len(weights)} entries for {len(dims)} dims")
        if target not in TARGETS:
            raise KdkitError(f"matryoshka.target={target!r}: use one of {', '.join(TARGETS)}")
        if loss not in LOSSES:
            raise KdkitError(f"matryoshka.loss={loss!r}: use one of {', '.join(LOSSES)}")
        self.dims, self.dim_weights, self.target, self.loss = dims, weights, target, loss
        self.fields = check_fields(fields, "matryoshka")
        self.projections = nn.ModuleDict()  # target=projection: "d<dim>" -> Linear(dim, D_t)

    def _rows(self, student: Outputs, teacher: Outputs) -> tuple[Tensor, Tensor]:
        names = text_fields(student, teacher, self.fields, "matryoshka")
        return field_rows(student, names), field_rows(teacher, names)

    def _check_widths(self, s: Tensor, t: Tensor) -> None:
        if max(self.dims) > s.shape[-1]:
            raise KdkitError(f"matryoshka.dims={self.dims}: the student's embeddings have {s.shape[-1]} "
                             f"dimensions; keep every dim <= {s.shape[-1]}")
        if self.target == "prefix" and max(self.dims) > t.shape[-1]:
            raise KdkitError(f"matryoshka target=prefix: dims={self.dims} exceed the teacher's "
                             f"{t.shape[-1]} dimensions (use target=similarity or projection)")

    def build(self, student: Outputs, teacher: Outputs, context) -> None:
        s, t = self._rows(student, teacher)
        self._check_widths(s, t)
        if self.target == "projection":
            for d in self.dims:
                if d != t.shape[-1] and f"d{d}" not in self.projections:
                    self.projections[f"d{d}"] = nn.Linear(d, t.shape[-1])

    def term(self, s: Tensor, t: Tensor, d: int) -> Tensor:
        """Unweighted ``L_d`` of student rows ``s`` and teacher rows ``t``."""
        prefix = truncate(s, d)
        if self.target == "similarity":
            return similarity_matrix_loss(prefix, t)
        if self.target == "prefix":
            return embedding_loss(prefix, truncate(t, d), self.loss)
        if d != t.shape[-1]:
            if f"d{d}" not in self.projections:
                raise KdkitError("matryoshka target=projection: adapters not built (the task builds "
                                 "them from a probe batch before training)")
            prefix = self.projections[f"d{d}"](prefix)
        return embedding_loss(prefix, t, self.loss)

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        s, t = self._rows(student, teacher)
        self._check_widths(s, t)
        return {f"d{d}": w * self.term(s, t, d) for d, w in zip(self.dims, self.dim_weights)}

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, dims={self.dims}, dim_weights={self.dim_weights}, "
                f"target={self.target}, loss={self.loss}, fields={self.fields}")
