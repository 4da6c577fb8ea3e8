"""Plackett-Luce distillation: a teacher-weighted list-wise ranking loss over the classes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.distillers.base import Distiller, check_same_shape, require
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs


def teacher_optimal_order(teacher_logits: Tensor, target: Tensor) -> Tensor:
    """``pi*`` per row ``[B, C]``: the true class first, then the others by descending teacher logit."""
    t = teacher_logits.float().detach()
    first = F.one_hot(target.long(), t.shape[1]).bool()
    return t.masked_fill(first, float("inf")).argsort(dim=1, descending=True, stable=True)


def pld_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
             teacher_temperature: float = 1.0) -> Tensor:
    """``mean_i sum_k alpha_k * ( logsumexp_{l >= k} s_{pi*_l} - s_{pi*_k} )`` (float32).

    ``alpha_k = softmax(t / tau)_{pi*_k}``: the teacher's probability of the class at rank k.
    """
    order = teacher_optimal_order(teacher_logits, target)
    s = student_logits.float().gather(1, order)
    alpha = F.softmax(teacher_logits.float().detach() / teacher_temperature, dim=1).gather(1, order)
    tail_lse = torch.logcumsumexp(s.flip(1), dim=1).flip(1)  # log sum_{l >= k} exp(s_l)
    return (alpha * (tail_lse - s)).sum(dim=1).mean()


class PLD(Distiller):
    """Plackett-Luce Distillation (Bassam, Zhu & Bian, "PLD: A Choice-Theoretic List-Wise
    Knowledge Distillation", NeurIPS 2025; arXiv 2506.12542).

    Teacher logits are read as Plackett-Luce "worths". The target ranking ``pi*`` puts the true
    label first, then the remaining classes by descending teacher confidence; the student's
    logits ``s`` are scored under the Plackett-Luce model of that ranking, each rank's choice
    weighted by the teacher's confidence in that class:

        L_PLD = (1/B) sum_i sum_{k=1}^{C} alpha_{i,k} * [ -s_{i,pi*_k} + log sum_{l=k}^{C} exp(s_{i,pi*_l}) ]
        alpha_{i,k} = softmax(z^t_i / tau)_{pi*_k}

    The first rank is a cross-entropy on the true class weighted by the teacher's probability
    of it; the loss is convex and invariant to adding a constant to the student's logits. The
    paper uses PLD in place of cross-entropy + KD (``task.task_loss_weight=0``). Needs
    ``batch["label"]``. Returns ``"loss"``.

    Args:
        weight: multiplier of the loss.
        teacher_temperature: ``tau`` of the teacher softmax that gives the rank weights (> 0).
    """

    reads_labels = True  # the target class of each row

    def __init__(self, weight: float = 1.0, teacher_temperature: float = 1.0):
        super().__init__(weight)
        if teacher_temperature <= 0:
            raise KdkitError(f"pld.teacher_temperature must be > 0, got {teacher_temperature}")
        self.teacher_temperature = float(teacher_temperature)

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        s = require(student, "logits", "pld")
        t = require(teacher, "logits", "pld")
        check_same_shape(s, t, "pld logits")
        if "label" not in batch:
            raise KdkitError("pld needs batch['label'] (the class ranked first) but the batch has none")
        return {"loss": pld_loss(s, t, batch["label"], self.teacher_temperature)}

    def extra_repr(self) -> str:
        return f"weight={self.weight}, teacher_temperature={self.teacher_temperature}"
