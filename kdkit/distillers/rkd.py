"""Relational KD: match distances and angles between samples in embedding space."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.distillers.base import Distiller, require
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs


def pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distance matrix ``[B, B]`` of rows of ``e``; zero diagonal, finite gradients."""
    sq = e.pow(2).sum(dim=1)
    with torch.autocast(e.device.type, enabled=False):  # |a|^2 + |b|^2 - 2ab cancels in bf16
        d2 = (sq[:, None] + sq[None, :] - 2 * e @ e.T).clamp(min=eps)
    d = d2.sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def _mean_normalized(d: Tensor) -> Tensor:
    """``d / mu`` with ``mu`` the mean over pairs at nonzero distance (the paper's 1/|X^2| sum)."""
    positive = (d > 0).sum().clamp(min=1)
    return d / (d.sum() / positive).clamp(min=1e-12)


def rkd_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """``mean_{i,j} huber(psi_D(s_i, s_j), psi_D(t_i, t_j))`` with mean-normalised distances."""
    return F.smooth_l1_loss(_mean_normalized(pairwise_distances(student)),
                            _mean_normalized(pairwise_distances(teacher)))


def triplet_cosines(e: Tensor) -> Tensor:
    """``[B, B, B]``: entry (j, i, k) = cos of the angle at ``e_j`` between ``e_i`` and ``e_k``."""
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # diff[j, i] = unit(e_i - e_j)
    with torch.autocast(e.device.type, enabled=False):
        return diff @ diff.transpose(1, 2)


def rkd_angle(student: Tensor, teacher: Tensor) -> Tensor:
    """``mean_{i,j,k} huber(psi_A(s_i, s_j, s_k), psi_A(t_i, t_j, t_k))``."""
    return F.smooth_l1_loss(triplet_cosines(student), triplet_cosines(teacher))


class RKD(Distiller):
    """Relational Knowledge Distillation (Park et al., CVPR 2019), on the pooled embeddings.

        psi_D(t_i, t_j) = ||t_i - t_j||_2 / mu,   mu = mean over pairs of ||t_i - t_j||_2
        psi_A(t_i, t_j, t_k) = < (t_i - t_j)/||t_i - t_j||, (t_k - t_j)/||t_k - t_j|| >
        L_RKD = lambda_D * mean huber(psi_D^s, psi_D^t) + lambda_A * mean huber(psi_A^s, psi_A^t)

    (Huber = smooth L1 with delta 1, means over all pairs / triplets of the batch, as in the
    paper's code and RepDistiller). Embedding widths may differ: only relations are compared.
    The angle term costs O(B^2 D) memory. Returns ``"distance"`` (= lambda_D * L_D) and
    ``"angle"`` (= lambda_A * L_A).

    Args:
        weight: multiplier of both terms (RepDistiller on CIFAR-100: 1).
        distance_weight: lambda_D (the paper and RepDistiller: 25).
        angle_weight: lambda_A (the paper and RepDistiller: 50).
    """

    def __init__(self, weight: float = 1.0, distance_weight: float = 25.0, angle_weight: float = 50.0):
        super().__init__(weight)
        self.distance_weight = float(distance_weight)
        self.angle_weight = float(angle_weight)

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        s = require(student, "embedding", "rkd").flatten(1).float()
        t = require(teacher, "embedding", "rkd").flatten(1).float()
        if s.shape[0] != t.shape[0]:
            raise KdkitError(f"rkd: student batch {s.shape[0]} != teacher batch {t.shape[0]}")
        return {"distance": self.distance_weight * rkd_distance(s, t),
                "angle": self.angle_weight * rkd_angle(s, t)}

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, distance_weight={self.distance_weight}, "
                f"angle_weight={self.angle_weight}")
