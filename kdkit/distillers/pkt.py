"""Probabilistic knowledge transfer: match the batch's cosine-kernel conditional densities."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.distillers.base import Distiller, require
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs


def cosine_conditionals(e: Tensor, eps: float = 1e-7) -> Tensor:
    """``[B, B]``: row ``i`` holds ``p_{j|i} = K(x_i, x_j) / sum_k K(x_i, x_k)`` with the cosine
    kernel rescaled to [0, 1], ``K(a, b) = (1 + cos(a, b)) / 2`` (the self-similarity included)."""
    unit = F.normalize(e.float().flatten(1), dim=1, eps=eps)
    with torch.autocast(unit.device.type, enabled=False):  # cosines in float32
        kernel = (unit @ unit.T + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt_loss(student: Tensor, teacher: Tensor, eps: float = 1e-7) -> Tensor:
    """``mean_{i,j} p_{j|i} log((p_{j|i} + eps) / (q_{j|i} + eps))``: teacher ``p``, student ``q``."""
    p, q = cosine_conditionals(teacher, eps), cosine_conditionals(student, eps)
    return (p * (torch.log(p + eps) - torch.log(q + eps))).mean()


class PKT(Distiller):
    """Probabilistic Knowledge Transfer (Passalis & Tefas, "Learning Deep Representations with
    Probabilistic Knowledge Transfer", ECCV 2018), on the pooled embeddings.

        K(a, b) = (1 + a^T b / (||a|| ||b||)) / 2
        p_{j|i} = K(t_i, t_j) / sum_k K(t_i, t_k),   q_{j|i} likewise on the student's s_i
        L_PKT = (1/B^2) sum_{i,j} p_{j|i} log(p_{j|i} / q_{j|i})

    a KL divergence between the teacher's and the student's conditional densities over the
    batch, so the embedding widths may differ. The paper writes the sums over ``j != i``; the
    authors' code (github.com/passalis/probabilistic_kt), which RepDistiller reuses, keeps the
    self-similarity ``K(x_i, x_i) = 1`` in the sums, averages over all ``B^2`` entries and adds
    ``eps = 1e-7`` inside the logarithm: kdkit does the same, so ``weight: 30000`` means what
    RepDistiller's ``-b 30000`` means. Returns the single term ``"loss"``.

    Args:
        weight: multiplier of the loss (RepDistiller on CIFAR-100: 30000).
        eps: added to the densities inside the logarithm (and the norms' floor).
    """

    def __init__(self, weight: float = 30000.0, eps: float = 1e-7):
        super().__init__(weight)
        if not eps > 0:
            raise KdkitError(f"pkt.eps must be > 0, got {eps}")
        self.eps = float(eps)

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        s = require(student, "embedding", "pkt")
        t = require(teacher, "embedding", "pkt")
        if s.shape[0] != t.shape[0]:
            raise KdkitError(f"pkt: student batch {s.shape[0]} != teacher batch {t.shape[0]}")
        return {"loss": pkt_loss(s, t, self.eps)}

    def extra_repr(self) -> str:
        return f"weight={self.weight}, eps={self.eps}"
