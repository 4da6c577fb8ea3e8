"""Margin-MSE: match the teacher's score margin between a positive and a negative passage."""

from __future__ import annotations

from torch import Tensor

from kdkit.distillers.base import Distiller
from kdkit.distillers.group_scores import group_scores, paired_group_scores
from kdkit.outputs import Outputs


def margin_mse(s_query: Tensor, s_passages: Tensor, t_query: Tensor, t_passages: Tensor) -> Tensor:
    """``mean_{i, j>=1} ((s_i0 - s_ij) - (t_i0 - t_ij))^2``: passage 0 of a group is the positive."""
    return margin_mse_scores(group_scores(s_query, s_passages), group_scores(t_query, t_passages))


def margin_mse_scores(s: Tensor, t: Tensor) -> Tensor:
    """Margin-MSE of group scores ``[B, G]`` (student ``s``, teacher ``t``; column 0 the positive)."""
    return ((s[:, :1] - s[:, 1:]) - (t[:, :1] - t[:, 1:])).pow(2).mean()


class MarginMSE(Distiller):
    """Margin-MSE (Hofstätter et al. 2020, "Improving Efficient Neural Ranking Models with
    Cross-Architecture Knowledge Distillation").

        L = mean_{q, p+, p-} ( (M_s(q, p+) - M_s(q, p-)) - (M_t(q, p+) - M_t(q, p-)) )^2

    with M_s the dot product of the student's embeddings (cosine for normalised models) and M_t
    the teacher's: the dot product of its embeddings, or a scorer teacher's own pair scores
    (``features["scores"]``: a cross-encoder, the paper's setting). Only margins are matched,
    so the student may score on its own scale and width. Reads ``features["query"]`` ``[B, D]``
    and ``features["passage"]`` ``[B, 1 + k, D]`` (positive first; ``data.stream=tuples`` or
    ``both``). Returns ``"loss"``.

    Args:
        weight: multiplier of the loss.
    """

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        s, t = paired_group_scores(student, teacher, "margin_mse")
        return {"loss": margin_mse_scores(s, t)}
