"""Margin-MSE: match the teacher's score margin between a positive and a negative passage."""

from __future__ import annotations

from torch import Tensor

from kdkit.distillers.base import Distiller, feature
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs


def group_scores(query: Tensor, passages: Tensor) -> Tensor:
    """``s[i, j] = <q_i, p_ij>`` for ``query [B, D]`` and its own passages ``[B, G, D]``."""
    return (passages.float() @ query.float().unsqueeze(-1)).squeeze(-1)


def margin_mse(s_query: Tensor, s_passages: Tensor, t_query: Tensor, t_passages: Tensor) -> Tensor:
    """``mean_{i, j>=1} ((s_i0 - s_ij) - (t_i0 - t_ij))^2``: passage 0 of a group is the positive."""
    s, t = group_scores(s_query, s_passages), group_scores(t_query, t_passages)
    return ((s[:, :1] - s[:, 1:]) - (t[:, :1] - t[:, 1:])).pow(2).mean()


class MarginMSE(Distiller):
    """Margin-MSE (Hofstätter et al. 2020, "Improving Efficient Neural Ranking Models with
    Cross-Architecture Knowledge Distillation").

        L = mean_{q, p+, p-} ( (M_s(q, p+) - M_s(q, p-)) - (M_t(q, p+) - M_t(q, p-)) )^2

    with M the dot product of the models' embeddings (cosine for normalised models). Only
    margins are matched, so the student may score on its own scale and width. Reads
    ``features["query"]`` ``[B, D]`` and ``features["passage"]`` ``[B, 1 + k, D]`` (positive
    first; ``data.stream=tuples`` or ``both``). Returns ``"loss"``.

    Args:
        weight: multiplier of the loss.
    """

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        sq, sp = feature(student, "query", "margin_mse"), feature(student, "passage", "margin_mse")
        tq, tp = feature(teacher, "query", "margin_mse"), feature(teacher, "passage", "margin_mse")
        if sp.shape[:2] != tp.shape[:2] or sp.shape[1] < 2:
            raise KdkitError(f"margin_mse: passage groups {tuple(sp.shape[:2])} (student) and "
                             f"{tuple(tp.shape[:2])} (teacher) must match and hold >= 1 negative")
        return {"loss": margin_mse(sq, sp, tq, tp)}
