"""Correlation congruence: match the batch's instance-correlation matrices."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.distillers.adapters import NormalizedLinear
from kdkit.distillers.base import DistillContext, Distiller, require
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs


def taylor_rbf_correlation(f: Tensor, gamma: float, order: int) -> Tensor:
    """``[B, B]`` Gaussian-RBF correlations of the unit-norm rows of ``f``, by Taylor expansion:

        k(x, y) = exp(-gamma ||x - y||^2) = exp(-2 gamma) exp(2 gamma x.y)
                ~ exp(-2 gamma) sum_{p=0}^{P} (2 gamma x.y)^p / p!
    """
    with torch.autocast(f.device.type, enabled=False):
        s = 2.0 * gamma * (f.float() @ f.float().T)
        total = torch.ones_like(s)
        term = torch.ones_like(s)
        for p in range(1, order + 1):
            term = term * s / p
            total = total + term
        return math.exp(-2.0 * gamma) * total


class CC(Distiller):
    """Correlation Congruence for Knowledge Distillation (Peng, Jin, Liu, Li, Wu, Liu, Zhou &
    Zhang, ICCV 2019).

    The pooled embeddings of student and teacher are projected by trainable linear heads to
    ``embed_dim`` and L2-normalised (``f_i``); the batch's correlation matrix uses the Gaussian
    RBF kernel approximated by its ``P``-th order Taylor expansion (exact for unit vectors up to
    the truncation):

        C_ij = exp(-2 gamma) sum_{p=0}^{P} (2 gamma)^p / p! (f_i . f_j)^p
        L_CC = (1 / B^2) ||C_s - C_t||_F^2

    Which reference kdkit follows: torchdistill's ``CCKDLoss`` (gaussian kernel, ``gamma=0.4``,
    ``max_p=2``, a trainable ``Linear4CCKD`` head on both models' pooled features, teacher
    backbone frozen). RepDistiller's ``Correlation`` is *not* this loss: it computes
    ``mean_i sum_d |s_i - t_i|_d |s_{i+1} - t_{i+1}|_d`` between consecutive samples of the
    (embedded, normalised) features, with no kernel and no B x B matrix. Two differences from
    torchdistill: the embeddings are L2-normalised before the kernel (the Taylor form of
    ``exp(-gamma ||x - y||^2)`` assumes unit vectors; torchdistill feeds the raw linear output),
    and the distance is the paper's *squared* Frobenius norm over ``B^2`` (torchdistill:
    ``torch.dist(...) / B^2``, not squared). The paper pairs CC with KD and cross-entropy;
    here that is ``distiller=[kd,cc]``. With ``project_teacher: false`` the teacher's embedding
    is only normalised (no trainable teacher head: the two heads cannot agree on a trivial
    constant correlation). Returns the single term ``"loss"``.

    Args:
        weight: multiplier of the loss (RepDistiller CIFAR-100 for its CC: 0.02).
        embed_dim: width of the linear heads (torchdistill and RepDistiller: 128).
        gamma: RBF kernel parameter (torchdistill: 0.4).
        order: Taylor order ``P`` (torchdistill: 2).
        project_teacher: learn a linear head on the teacher's embedding too (torchdistill).
    """

    def __init__(self, weight: float = 0.02, embed_dim: int = 128, gamma: float = 0.4,
                 order: int = 2, project_teacher: bool = True):
        super().__init__(weight)
        if embed_dim < 1 or gamma <= 0 or order < 0:
            raise KdkitError(f"cc: need embed_dim >= 1, gamma > 0 and order >= 0; got "
                             f"embed_dim={embed_dim}, gamma={gamma}, order={order}")
        self.embed_dim, self.gamma, self.order = int(embed_dim), float(gamma), int(order)
        self.project_teacher = bool(project_teacher)
        self.embed_s = self.embed_t = None

    def build(self, student: Outputs, teacher: Outputs, context: DistillContext) -> None:
        s = require(student, "embedding", "cc").flatten(1)
        t = require(teacher, "embedding", "cc").flatten(1)
        self.embed_s = NormalizedLinear(s.shape[1], self.embed_dim).to(s.device)
        if self.project_teacher:
            self.embed_t = NormalizedLinear(t.shape[1], self.embed_dim).to(s.device)

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        if self.embed_s is None:
            raise RuntimeError("cc: build() must run (on a probe forward) before forward()")
        s = require(student, "embedding", "cc").flatten(1)
        t = require(teacher, "embedding", "cc").flatten(1)
        if s.shape[0] != t.shape[0]:
            raise KdkitError(f"cc: student batch {s.shape[0]} != teacher batch {t.shape[0]}")
        f_s = self.embed_s(s)
        f_t = self.embed_t(t) if self.embed_t is not None else F.normalize(t.float(), dim=1)
        c_s = taylor_rbf_correlation(f_s, self.gamma, self.order)
        c_t = taylor_rbf_correlation(f_t, self.gamma, self.order)
        return {"loss": (c_s - c_t).pow(2).mean()}

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, embed_dim={self.embed_dim}, gamma={self.gamma}, "
                f"order={self.order}, project_teacher={self.project_teacher}")
