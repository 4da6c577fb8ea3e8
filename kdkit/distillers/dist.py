"""DIST: match the correlations of predictions rather than the predictions themselves."""

from __future__ import annotations

from torch import Tensor

from kdkit.distillers.base import Distiller, check_same_shape, require
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs


def pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation between row ``i`` of ``a`` and row ``i`` of ``b``: shape ``[rows]``."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_terms(student_logits: Tensor, teacher_logits: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """Unweighted ``(inter, intra)`` relation losses, each scaled by ``tau^2`` (float32)."""
    y_s = (student_logits.float() / tau).softmax(dim=1)
    y_t = (teacher_logits.float() / tau).softmax(dim=1)
    inter = 1 - pearson_rows(y_s, y_t).mean()      # per sample, over classes
    intra = 1 - pearson_rows(y_s.T, y_t.T).mean()  # per class, over the batch
    return inter * tau**2, intra * tau**2


class DIST(Distiller):
    """DIST, "Knowledge Distillation from A Stronger Teacher" (Huang et al., NeurIPS 2022).

    With Y = softmax(Z / tau) for B samples x C classes and rho_p the Pearson correlation,

        L_inter = tau^2 * (1 - (1/B) sum_i rho_p(Y^s_{i,:}, Y^t_{i,:}))
        L_intra = tau^2 * (1 - (1/C) sum_j rho_p(Y^s_{:,j}, Y^t_{:,j}))
        L_DIST  = beta * L_inter + gamma * L_intra

    Correlation ignores shifts and scales of the predictions, so a weaker student only has to
    preserve the teacher's relations. Returns ``"inter"`` (= beta * L_inter) and ``"intra"``
    (= gamma * L_intra). Defaults: the CIFAR-100 setting beta = gamma = 2, tau = 4 (ImageNet:
    beta = gamma = tau = 1).

    Args:
        weight: multiplier of both terms.
        beta: weight of the inter-class relation.
        gamma: weight of the intra-class relation.
        tau: softmax temperature (> 0).
    """

    def __init__(self, weight: float = 1.0, beta: float = 2.0, gamma: float = 2.0, tau: float = 4.0):
        super().__init__(weight)
        if tau <= 0:
            raise KdkitError(f"dist.tau must be > 0, got {tau}")
        self.beta, self.gamma, self.tau = float(beta), float(gamma), float(tau)

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        s = require(student, "logits", "dist")
        t = require(teacher, "logits", "dist")
        check_same_shape(s, t, "dist logits")
        inter, intra = dist_terms(s, t, self.tau)
        return {"inter": self.beta * inter, "intra": self.gamma * intra}

    def extra_repr(self) -> str:
        return f"weight={self.weight}, beta={self.beta}, gamma={self.gamma}, tau={self.tau}"
