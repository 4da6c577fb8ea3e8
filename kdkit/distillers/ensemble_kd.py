"""Knowledge distillation from the averaged distribution of several teachers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.distillers.base import MultiTeacherDistiller, check_same_shape, read_teachers, require
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs


def ensemble_kd_loss(student_logits: Tensor, teacher_logits: list[Tensor], weights: Tensor,
                     temperature: float) -> Tensor:
    """``T^2 * mean_i KL(sum_k w_k softmax(z^k_i / T) || softmax(z^s_i / T))`` in float32.

    ``weights`` (one per teacher) must sum to 1.
    """
    probs = torch.stack([F.softmax(t.float() / temperature, dim=1) for t in teacher_logits])
    target = (weights.to(probs).view(-1, 1, 1) * probs).sum(0)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    return F.kl_div(log_p_s, target, reduction="batchmean") * temperature**2


class EnsembleKD(MultiTeacherDistiller):
    """KD against an ensemble of teachers: the (fixed-)weighted mean of their softened class
    distributions (Hinton, Vinyals & Dean 2015, Sec. 1 and 4; You et al., "Learning from Multiple
    Teacher Networks", KDD 2017, average the teachers' soft targets the same way).

        p^ens_i = sum_k w_k softmax(z^k_i / T),   L = T^2 * (1/B) sum_i KL(p^ens_i || softmax(z^s_i / T))

    Averaging probabilities (not logits) keeps each teacher's confidence: a teacher unsure
    of a sample spreads its share of the mass.

    Args:
        weight: multiplier of the loss.
        teachers: names of the teachers averaged (None: every teacher of the run).
        weights: ``{name: w}`` fixed weights (normalised to sum to 1); None: uniform.
        temperature: softmax temperature ``T`` (> 0).
    """

    def __init__(self, weight: float = 1.0, teachers=None, weights=None, temperature: float = 4.0):
        super().__init__(weight, teachers)
        if temperature <= 0:
            raise KdkitError(f"ensemble_kd.temperature must be > 0, got {temperature}")
        if weights is not None and (not weights or any(float(w) < 0 for w in weights.values())
                                    or sum(float(w) for w in weights.values()) <= 0):
            raise KdkitError(f"ensemble_kd.weights={dict(weights)}: give non-negative weights, not all zero")
        self.temperature = float(temperature)
        self.teacher_weights = None if weights is None else {str(k): float(v) for k, v in weights.items()}

    def mixing(self, names: list[str]) -> Tensor:
        """The normalised weight of each teacher in ``names`` order."""
        if self.teacher_weights is None:
            return torch.full((len(names),), 1.0 / len(names))
        missing = [n for n in names if n not in self.teacher_weights]
        if missing:
            raise KdkitError(f"ensemble_kd.weights has no weight for teachers {missing}")
        w = torch.tensor([self.teacher_weights[n] for n in names])
        return w / w.sum()

    def build(self, student: Outputs, teachers: dict[str, Outputs], context) -> None:
        read_teachers(teachers, "ensemble_kd", at_least=1)
        self.mixing(list(teachers))  # fail now on a weight for a missing teacher
        s = require(student, "logits", "ensemble_kd")
        for name, t in teachers.items():
            check_same_shape(s, require(t, "logits", "ensemble_kd"), f"ensemble_kd logits of teacher '{name}'")

    def forward(self, student: Outputs, teachers: dict[str, Outputs], batch: dict) -> dict[str, Tensor]:
        names = list(teachers)
        logits = [require(teachers[n], "logits", "ensemble_kd") for n in names]
        return {"loss": ensemble_kd_loss(require(student, "logits", "ensemble_kd"), logits,
                                         self.mixing(names), self.temperature)}

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, teachers={self.teacher_names or 'all'}, "
                f"weights={self.teacher_weights or 'uniform'}, temperature={self.temperature}")
