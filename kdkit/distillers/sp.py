"""Similarity-preserving KD: match the batch's pairwise similarity matrices."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.distillers.at import parse_pairs
from kdkit.distillers.base import Distiller, feature, require
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs


def similarity_matrix(f: Tensor) -> Tensor:
    """``G = row_normalize(Q Q^T)`` with ``Q`` the flattened features ``[B, -1]``: ``[B, B]``."""
    q = f.float().flatten(1)
    with torch.autocast(q.device.type, enabled=False):  # keep the Gram matrix in float32
        return F.normalize(q @ q.T, p=2, dim=1)


def sp_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """``||G_s - G_t||_F^2 / B^2``."""
    b = f_s.shape[0]
    return (similarity_matrix(f_s) - similarity_matrix(f_t)).pow(2).sum() / b**2


class SP(Distiller):
    """Similarity-Preserving KD (Tung & Mori, ICCV 2019).

        G = row_L2_normalize(Q Q^T),  Q = A reshaped to [B, C*H*W]
        L_SP = sum over pairs of (1/B^2) ||G_s - G_t||_F^2

    Samples that the teacher finds alike should look alike to the student; feature shapes may
    differ (only the B x B matrices are compared). With ``pairs: null`` the pooled embeddings
    are compared; RepDistiller uses the last stage's map before pooling (e.g.
    ``[[layer3, layer3]]`` for CIFAR ResNets). Returns the single term ``"loss"``.

    Args:
        weight: multiplier of the loss (RepDistiller on CIFAR-100: 3000).
        pairs: ``[[student_module, teacher_module], ...]``, or None for the embeddings.
    """

    def __init__(self, weight: float = 3000.0, pairs: Sequence | None = None):
        super().__init__(weight)
        self.pairs = None if pairs is None else parse_pairs(pairs, "sp")

    @property
    def student_features(self) -> list[str]:
        return [s for s, _ in self.pairs or []]

    @property
    def teacher_features(self) -> list[str]:
        return [t for _, t in self.pairs or []]

    def _tensors(self, student: Outputs, teacher: Outputs):
        if self.pairs is None:
            yield require(student, "embedding", "sp"), require(teacher, "embedding", "sp")
        for s_name, t_name in self.pairs or []:
            yield feature(student, s_name, "sp"), feature(teacher, t_name, "sp")

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        total = 0.0
        for f_s, f_t in self._tensors(student, teacher):
            if f_s.shape[0] != f_t.shape[0]:
                raise KdkitError(f"sp: student batch {f_s.shape[0]} != teacher batch {f_t.shape[0]}")
            total = total + sp_loss(f_s, f_t)
        return {"loss": total}

    def extra_repr(self) -> str:
        return f"weight={self.weight}, pairs={self.pairs or 'embedding'}"
