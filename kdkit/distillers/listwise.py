"""Listwise distillation of the teacher's score distribution over in-batch and hard negatives."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdkit.distillers.base import Distiller, feature
from kdkit.distillers.group_scores import group_scores
from kdkit.distributed import gather, gather_nograd
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs


def listwise_kl(s_query: Tensor, s_passages: Tensor, t_query: Tensor, t_passages: Tensor,
                temperature: float, teacher_temperature: float | None = None) -> Tensor:
    """``mean_i KL(softmax(t_i / tau_t) || softmax(s_i / tau))`` over the columns of the scores.

    ``s_i = [<q_i, p_j>]_j`` for every passage row ``p_j`` of ``*_passages`` ``[N, D]`` (all
    passages of the batch: each query's positive and hard negatives and everyone else's).
    """
    tau_t = teacher_temperature or temperature
    log_p_s = F.log_softmax(s_query.float() @ s_passages.float().T / temperature, dim=1)
    log_p_t = F.log_softmax(t_query.float() @ t_passages.float().T / tau_t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def group_listwise_kl(s: Tensor, t: Tensor, temperature: float, teacher_temperature: float | None = None) -> Tensor:
    """``mean_i KL(softmax(t_i / tau_t) || softmax(s_i / tau))`` over each query's own group:
    student ``s`` and teacher ``t`` scores ``[B, G]``."""
    if s.shape != t.shape:
        raise KdkitError(f"listwise: passage groups {tuple(s.shape)} (student) != {tuple(t.shape)} (teacher scores)")
    log_p_s = F.log_softmax(s.float() / temperature, dim=1)
    log_p_t = F.log_softmax(t.float() / (teacher_temperature or temperature), dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


class Listwise(Distiller):
    """Listwise score distillation over in-batch and hard negatives (RocketQAv2, Ren et al. 2021,
    "dynamic listwise distillation"; also the listwise KL of PairDistill, Huang et al. 2024).

        L = (1/B) sum_i KL( softmax_j(M_t(q_i, p_j) / tau_t) || softmax_j(M_s(q_i, p_j) / tau) )

    with j over every passage of the global batch: gathered from all ranks (with gradients for
    the local slice, ``kdkit.distributed.gather``), so 2 processes x B give the loss of one
    process x 2B. Reads ``features["query"]`` ``[B, D]`` and ``features["passage"]``
    ``[B, 1 + k, D]`` (``data.stream=tuples`` or ``both``). Returns ``"loss"``.

    With a scorer teacher (``features["scores"]`` ``[B, 1 + k]``: a cross-encoder or MaxSim,
    scored before training for each query's own group only) j runs over the query's own group
    instead: both softmaxes are over its positive and its k hard negatives (RocketQAv2's
    listwise setting), with no in-batch negatives.

    Args:
        weight: multiplier of the loss.
        temperature: tau of the student's softmax (cosine scores lie in [-1, 1]: ~0.05).
        teacher_temperature: tau_t of the teacher's softmax (None: ``temperature``).
    """

    def __init__(self, weight: float = 1.0, temperature: float = 0.05, teacher_temperature: float | None = None):
        super().__init__(weight)
        if temperature <= 0 or (teacher_temperature is not None and teacher_temperature <= 0):
            raise KdkitError("listwise temperatures must be > 0")
        self.temperature = float(temperature)
        self.teacher_temperature = None if teacher_temperature is None else float(teacher_temperature)

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        sq, sp = feature(student, "query", "listwise"), feature(student, "passage", "listwise")
        if "scores" in teacher.features:  # a scorer knows each query's own group only
            return {"loss": group_listwise_kl(group_scores(sq, sp), teacher.features["scores"],
                                              self.temperature, self.teacher_temperature)}
        tq, tp = feature(teacher, "query", "listwise"), feature(teacher, "passage", "listwise")
        if sp.shape[:2] != tp.shape[:2]:
            raise KdkitError(f"listwise: passage groups {tuple(sp.shape[:2])} (student) != "
                             f"{tuple(tp.shape[:2])} (teacher)")
        s_all, _ = gather(sp.reshape(-1, sp.shape[-1]))
        t_all = gather_nograd(tp.reshape(-1, tp.shape[-1]).float())
        return {"loss": listwise_kl(sq, s_all, tq, t_all, self.temperature, self.teacher_temperature)}

    def extra_repr(self) -> str:
        return f"weight={self.weight}, temperature={self.temperature}, teacher_temperature={self.teacher_temperature}"
