"""Hidden node representation distillation through an adapter (NOSMOG-style)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.distillers.base import DistillContext, Distiller, require
from kdkit.errors import KdkitError

LOSSES = ("mse", "cosine", "similarity")


def hidden_loss(student: Tensor, teacher: Tensor, kind: str) -> Tensor:
    """Distance between adapted student embeddings ``student`` [N, D] and teacher ones [N, D].

    - ``mse``: 1/(N D) sum_i ||s_i - t_i||^2
    - ``cosine``: 1/N sum_i (1 - cos(s_i, t_i))
    - ``similarity``: NOSMOG's representation similarity distillation,
      1/N^2 ||S S^T - T T^T||_F^2 (matches how every pair of nodes relates, not the vectors).
    """
    if kind == "mse":
        return F.mse_loss(student, teacher)
    if kind == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    return ((student @ student.T - teacher @ teacher.T) ** 2).mean()


class HiddenRep(Distiller):
    """Match the student's hidden node embeddings to the GNN teacher's through a learnt linear
    adapter A (the representation distillation of NOSMOG, Tian et al., ICLR 2023, "Learning MLPs
    on Graphs: A Unified View of Effectiveness, Robustness, and Efficiency"):

        L = d(A h^S, h^T),   d = MSE, 1 - cosine, or NOSMOG's similarity form
        L_RSD = mean((A(H^S) A(H^S)^T - H^T H^T^T)^2) over a node sample

    ``h`` is ``Outputs.embedding`` (``NodeTask`` taps the models' ``embedding`` module: the last
    hidden layer). The adapter maps the student width to the teacher width, trains with the
    student and is built at the probe forward. The similarity form is relational (node pairs),
    so it draws ``max_nodes`` nodes at random per step when the batch is larger (N^2 memory).

    Args:
        weight: multiplier of the loss.
        loss: "mse", "cosine" or "similarity".
        max_nodes: node sample size for ``similarity`` (None: all nodes).
    """

    def __init__(self, weight: float = 1.0, loss: str = "mse", max_nodes: int | None = 1024):
        super().__init__(weight)
        if loss not in LOSSES:
            raise KdkitError(f"hidden.loss={loss!r}: use one of {', '.join(LOSSES)}")
        self.loss = loss
        self.max_nodes = max_nodes
        self.adapter: nn.Module | None = None

    def build(self, student, teacher, context: DistillContext) -> None:
        s = require(student, "embedding", "hidden")
        t = require(teacher, "embedding", "hidden")
        self.adapter = nn.Linear(s.shape[-1], t.shape[-1]).to(s.device)

    def forward(self, student, teacher, batch: dict) -> dict[str, Tensor]:
        if self.adapter is None:
            raise KdkitError("hidden: the adapter is not built (the task's probe forward builds it)")
        s = self.adapter(require(student, "embedding", "hidden").float())
        t = require(teacher, "embedding", "hidden").float()
        if self.loss == "similarity" and self.max_nodes and s.shape[0] > self.max_nodes:
            pick = torch.randperm(s.shape[0], device=s.device)[: self.max_nodes]
            s, t = s[pick], t[pick]
        return {"loss": hidden_loss(s, t, self.loss)}

    def extra_repr(self) -> str:
        return f"weight={self.weight}, loss={self.loss}, max_nodes={self.max_nodes}"
