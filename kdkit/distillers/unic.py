"""UNIC: one expendable projector head per teacher on the student's embedding, with teacher
dropping."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.distillers.base import MultiTeacherDistiller, read_teachers, require
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs


def per_sample_regression(pred: Tensor, target: Tensor, cos_weight: float, l1_weight: float) -> Tensor:
    """``[B]``: ``cos_weight * (1 - cos(pred, target)) + l1_weight * mean_d smoothL1(pred, target)``."""
    pred, target = pred.float(), target.float()
    cos = 1.0 - F.cosine_similarity(pred, target, dim=-1)
    l1 = F.smooth_l1_loss(pred, target, reduction="none", beta=1.0).mean(-1)
    return cos_weight * cos + l1_weight * l1


def teacher_dropping(losses: Tensor, drop_prob: float, generator: torch.Generator | None = None) -> Tensor:
    """``[K, B]`` 0/1 coefficients: per sample, the teacher with the largest loss is kept and
    every other teacher is dropped with probability ``drop_prob``."""
    keep = torch.rand(losses.shape, generator=generator, device="cpu").to(losses.device) >= drop_prob
    top = losses.argmax(0)
    keep[top, torch.arange(losses.shape[1], device=losses.device)] = True
    return keep.to(losses.dtype)


class UNIC(MultiTeacherDistiller):
    """UNIC (Sariyildiz, Weinzaepfel, Lucas, Larlus & Kalantidis, "UNIC: Universal Classification
    Models via Multi-teacher Distillation", ECCV 2024): the student's embedding goes through one
    projector head per teacher (a 2-layer MLP, dropped after training), and each head regresses
    its teacher's embedding with cosine + smooth-L1:

        l^k_i = a * (1 - cos(h_k(s_i), t^k_i)) + b * smoothL1(h_k(s_i), t^k_i)
        L = sum_{k,i} c^k_i l^k_i / sum_{k,i} c^k_i

    Teacher dropping (the paper's regulariser that balances the teachers): per sample, the
    teacher with the largest loss always counts (``c = 1``) and each other teacher is dropped
    (``c = 0``) with probability ``drop_prob``; at ``drop_prob = 0`` every teacher counts equally.
    The paper's ladder of projectors over intermediate blocks is not included (one head per
    teacher on the final embedding).

    Args:
        weight: multiplier of the loss.
        teachers: names of the teachers distilled (None: every teacher of the run).
        hidden: width of each head's hidden layer (None: the teacher's embedding width).
        cos_weight, l1_weight: ``a`` and ``b`` (the paper: 0.5 and 0.5).
        drop_prob: teacher-dropping probability (the paper: 0.5); 0 switches it off.
    """

    def __init__(self, weight: float = 1.0, teachers=None, hidden: int | None = None,
                 cos_weight: float = 0.5, l1_weight: float = 0.5, drop_prob: float = 0.5):
        super().__init__(weight, teachers)
        if not 0.0 <= drop_prob < 1.0:
            raise KdkitError(f"unic.drop_prob={drop_prob} must be in [0, 1)")
        if cos_weight < 0 or l1_weight < 0 or cos_weight + l1_weight <= 0:
            raise KdkitError("unic.cos_weight and unic.l1_weight must be >= 0 and not both 0")
        self.hidden = hidden
        self.cos_weight, self.l1_weight, self.drop_prob = float(cos_weight), float(l1_weight), float(drop_prob)
        self.heads = nn.ModuleDict()

    def build(self, student: Outputs, teachers: dict[str, Outputs], context) -> None:
        read_teachers(teachers, "unic", at_least=1)
        d_s = require(student, "embedding", "unic").shape[-1]
        for name, t in teachers.items():
            d_t = require(t, "embedding", "unic").shape[-1]
            hidden = self.hidden or d_t
            self.heads[name] = nn.Sequential(nn.Linear(d_s, hidden), nn.GELU(), nn.Linear(hidden, d_t))

    def losses_per_teacher(self, student: Outputs, teachers: dict[str, Outputs]) -> Tensor:
        """``[K, B]`` regression loss of every head against its teacher."""
        s = require(student, "embedding", "unic").float()
        return torch.stack([
            per_sample_regression(self.heads[name](s), require(t, "embedding", "unic"),
                                  self.cos_weight, self.l1_weight)
            for name, t in teachers.items()])

    def forward(self, student: Outputs, teachers: dict[str, Outputs], batch: dict) -> dict[str, Tensor]:
        losses = self.losses_per_teacher(student, teachers)
        if self.training and self.drop_prob > 0 and losses.shape[0] > 1:
            coeffs = teacher_dropping(losses.detach(), self.drop_prob)
        else:
            coeffs = torch.ones_like(losses)
        return {"loss": (coeffs * losses).sum() / coeffs.sum()}

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, teachers={self.teacher_names or 'all'}, drop_prob={self.drop_prob}, "
                f"cos_weight={self.cos_weight}, l1_weight={self.l1_weight}")
