"""FF-G2M: full-frequency GNN-to-MLP distillation (Wu et al., AAAI 2023)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdkit.distillers.base import Distiller, require
from kdkit.errors import KdkitError


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Mean over rows of KL(p || q), from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def low_frequency_loss(student_logits: Tensor, teacher_logits: Tensor, edge_index: Tensor) -> Tensor:
    """LFD: for every edge (i, j) of the graph *with* self-loops, KL(p^T_j || p^S_i).

    The student's distribution at node i matches the teacher's at i and at each neighbour j:
    the smooth (low-frequency) part of what the GNN learnt, its neighbourhood-averaged output.
    """
    src, dst = edge_index
    return _kl(F.log_softmax(teacher_logits, -1)[dst], F.log_softmax(student_logits, -1)[src])


def high_frequency_loss(student_logits: Tensor, teacher_logits: Tensor, edge_index: Tensor,
                        tau: float) -> Tensor:
    """HFD: for every edge (i, j) *without* self-loops,
    KL(softmax(|z^T_i - z^T_j| / tau) || softmax(|z^S_i - z^S_j| / tau)).

    The absolute logit difference between a node and its neighbour is the high-frequency part
    (the graph Laplacian's action); matching its distribution keeps it from being drowned by
    the low-frequency term.
    """
    src, dst = edge_index
    t = F.log_softmax((teacher_logits[src] - teacher_logits[dst]).abs() / tau, -1)
    s = F.log_softmax((student_logits[src] - student_logits[dst]).abs() / tau, -1)
    return _kl(t, s)


class FFG2M(Distiller):
    """Full-Frequency GNN-to-MLP distillation (Wu, Lin, Huang, Fan, Li: "Extracting Low-/High-
    Frequency Knowledge from Graph Neural Networks and Injecting it into MLPs", AAAI 2023).

    With teacher logits z^T, student logits z^S, p = softmax(z), Ẽ the edges plus self-loops
    and E the edges without them (the paper's official code, ``edge_distribution_low/high``):

        L_LFD = 1/|Ẽ| sum_{(i,j) in Ẽ} KL(p^T_j || p^S_i)
        L_HFD = 1/|E| sum_{(i,j) in E} KL(softmax(|z^T_i - z^T_j| / tau) || softmax(|z^S_i - z^S_j| / tau))

    Returns the terms ``low`` and ``high`` (each times ``low_weight`` / ``high_weight``); the
    paper's objective lambda * CE + (1 - lambda) * (L_LFD + L_HFD) is ``task.task_loss_weight
    = lambda`` and ``weight = 1 - lambda``. Reads ``batch["edge_index"]``: the graph of the
    batch (the observed graph in the inductive setting), over all its nodes.

    Args:
        weight: multiplier of both terms.
        tau: temperature of the high-frequency distributions (paper: 1.0-1.5).
        low_weight, high_weight: relative weights of the two terms (0 switches one off, the
            paper's LFD-only / HFD-only ablations).
    """

    def __init__(self, weight: float = 1.0, tau: float = 1.5, low_weight: float = 1.0,
                 high_weight: float = 1.0):
        super().__init__(weight)
        if tau <= 0:
            raise KdkitError(f"ffg2m.tau must be > 0, got {tau}")
        self.tau = float(tau)
        self.low_weight = float(low_weight)
        self.high_weight = float(high_weight)

    def forward(self, student, teacher, batch: dict) -> dict[str, Tensor]:
        from torch_geometric.utils import add_self_loops, remove_self_loops

        if "edge_index" not in batch:
            raise KdkitError("ffg2m needs batch['edge_index']: use it with a graph datamodule")
        s = require(student, "logits", "ffg2m").float()
        t = require(teacher, "logits", "ffg2m").float()
        edges, _ = remove_self_loops(batch["edge_index"])
        loops, _ = add_self_loops(edges, num_nodes=s.shape[0])
        terms = {}
        if self.low_weight:
            terms["low"] = self.low_weight * low_frequency_loss(s, t, loops)
        if self.high_weight:
            high = high_frequency_loss(s, t, edges, self.tau) if edges.numel() else s.sum() * 0
            terms["high"] = self.high_weight * high
        return terms

    def extra_repr(self) -> str:
        return f"weight={self.weight}, tau={self.tau}, low={self.low_weight}, high={self.high_weight}"


__all__ = ["FFG2M", "high_frequency_loss", "low_frequency_loss"]
