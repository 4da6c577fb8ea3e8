"""Pairwise relevance distillation: the student's preference between two passages of a query."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.distillers.base import Distiller
from kdkit.distillers.group_scores import paired_group_scores
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs


def pairwise_kl(s: Tensor, t: Tensor, temperature: float = 1.0, teacher_temperature: float | None = None) -> Tensor:
    """``mean_{i, j<k} KL([P_t, 1 - P_t] || [P_s, 1 - P_s])`` over the pairs of each group, with
    ``P(j > k) = sigmoid((x_ij - x_ik) / tau)`` = the softmax of the pair's two scores.

    ``s``, ``t``: student and teacher scores ``[B, G]`` of each query with its group's passages.
    """
    j, k = torch.triu_indices(s.shape[1], s.shape[1], offset=1, device=s.device)
    d_s = (s[:, j] - s[:, k]).float() / temperature
    d_t = (t[:, j] - t[:, k]).float() / (teacher_temperature or temperature)
    # log P and log (1 - P) from logsigmoid: exact where P is near 0 or 1
    log_s = torch.stack([F.logsigmoid(d_s), F.logsigmoid(-d_s)])
    log_t = torch.stack([F.logsigmoid(d_t), F.logsigmoid(-d_t)])
    return (log_t.exp() * (log_t - log_s)).sum(0).mean()


class PairDistill(Distiller):
    """Pairwise relevance distillation (Huang & Chen, EMNLP 2024, "PairDistill: Pairwise
    Relevance Distillation for Dense Retrieval"), its pairwise term:

        P_s(p_j > p_k | q) = exp(s_j / tau) / (exp(s_j / tau) + exp(s_k / tau)) = sigmoid((s_j - s_k) / tau)
        L_pair = mean_{q, j<k} KL( [P_t, 1 - P_t] || [P_s, 1 - P_s] )

    with ``s_j`` the dot product of the student's query and passage j (cosine for normalised
    models) over every pair of each query's group (positive and hard negatives). The paper's
    ``P_t`` comes from a pairwise reranker (duoT5-style) run on sampled pairs; here the teacher
    gives group scores, a scorer's ``features["scores"]`` (e.g. a cross-encoder's logits) or a
    bi-encoder's dot products, and ``P_t = sigmoid((t_j - t_k) / tau_t)``, so every pair is
    cheap. The paper trains with ``L_CE + L_KD + alpha L_pair``: ``L_KD`` the pointwise KL on
    the group (kdkit's ``listwise`` is that KL over the global batch), ``L_CE`` in-batch
    InfoNCE (``task.task_loss_weight=1``), alpha = this distiller's weight (1 in the authors'
    DPR config, 3 in their ColBERT one). Reads ``features["query"]`` ``[B, D]`` and
    ``features["passage"]`` ``[B, G >= 2, D]`` (``data.stream=tuples`` or ``both``). Returns
    ``"loss"``.

    Args:
        weight: multiplier of the loss (the paper's alpha).
        temperature: tau of the student's scores (cosines lie in [-1, 1]: ~0.05; the authors'
            DPR, on raw dot products, 1).
        teacher_temperature: tau_t of the teacher's scores (None: ``temperature``; 1 for a
            cross-encoder's logits).
    """

    def __init__(self, weight: float = 1.0, temperature: float = 0.05, teacher_temperature: float | None = None):
        super().__init__(weight)
        if temperature <= 0 or (teacher_temperature is not None and teacher_temperature <= 0):
            raise KdkitError("pairdistill temperatures must be > 0")
        self.temperature = float(temperature)
        self.teacher_temperature = None if teacher_temperature is None else float(teacher_temperature)

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        s, t = paired_group_scores(student, teacher, "pairdistill")
        return {"loss": pairwise_kl(s, t.detach(), self.temperature, self.teacher_temperature)}

    def extra_repr(self) -> str:
        return f"weight={self.weight}, temperature={self.temperature}, teacher_temperature={self.teacher_temperature}"
