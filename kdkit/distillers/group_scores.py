"""The teacher's score of each query with each passage of its group, from a scorer or embeddings.

Retrieval teachers come in two kinds: bi-encoders embed queries and passages (``features["query"]``
``[B, D]``, ``features["passage"]`` ``[B, G, D]``), scorers (cross-encoders, late-interaction
MaxSim) score (query, passage) pairs and give ``features["scores"]`` ``[B, G]`` directly. Score
distillers (Margin-MSE, listwise KL on the group, PairDistill) read both through
``teacher_group_scores``.
"""

from __future__ import annotations

from torch import Tensor

from kdkit.distillers.base import feature
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs


def group_scores(query: Tensor, passages: Tensor) -> Tensor:
    """``s[i, j] = <q_i, p_ij>`` for ``query [B, D]`` and its own passages ``[B, G, D]``."""
    return (passages.float() @ query.float().unsqueeze(-1)).squeeze(-1)


def teacher_group_scores(outputs: Outputs, who: str) -> Tensor:
    """``[B, G]`` scores of each query with its group's passages (position 0: the positive):
    a scorer's ``features["scores"]``, else the dot products of the embeddings."""
    if "scores" in outputs.features:
        return outputs.features["scores"].float()
    return group_scores(feature(outputs, "query", who), feature(outputs, "passage", who))


def paired_group_scores(student: Outputs, teacher: Outputs, who: str) -> tuple[Tensor, Tensor]:
    """The student's ``[B, G]`` group scores (dot products of its embeddings) and the teacher's
    (``teacher_group_scores``), checked to have the same groups of >= 2 passages (a positive and
    >= 1 negative)."""
    s = group_scores(feature(student, "query", who), feature(student, "passage", who))
    t = teacher_group_scores(teacher, who)
    if s.shape != t.shape or s.shape[1] < 2:
        raise KdkitError(f"{who}: passage groups {tuple(s.shape)} (student) and {tuple(t.shape)} (teacher) "
                         "must match and hold >= 2 passages (a positive and >= 1 negative)")
    return s, t
