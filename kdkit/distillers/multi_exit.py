"""Multi-exit self-distillation: a student that can be cut after any of several blocks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kdkit.distillers.base import Distiller, check_same_shape, feature
from kdkit.distillers.embed import FIELDS, embedding_loss
from kdkit.distillers.listwise import listwise_kl
from kdkit.distributed import gather, gather_nograd
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs
from kdkit.distillers.layer_names import layer_feature

LOSSES = ("cosine", "mse", "listwise")
TARGETS = ("top", "above")


class MultiExit(Distiller):
    """Multi-exit self-distillation of a retrieval student: the exits after blocks ``exits``
    (0-based) learn from the exits above them, the top exit (the whole model) from the teacher,
    so the trained model can be cut after any exit (``task.eval_exits`` scores each cut,
    ``task.export_exits`` writes them).

    Self-knowledge distillation as in BGE M3-Embedding (Chen et al. 2024, Sec. 3.2): there each
    retrieval mode's score distribution is taught by the detached, integrated score
    ``s_inter`` as a soft label, ``L'_* = -p(s_inter) log p(s_*)``; here the "modes" are
    exits of one encoder and the soft label is the exit above (higher layers guide earlier
    ones, the multi-exit layout of MoSE / ModularStarEncoder, Gurioli et al. 2025). With
    ``e_k(x)`` the embedding of text ``x`` after block ``k`` (the encoder's pooling,
    projection and normalisation applied to that block's states), ``top`` the last block,
    ``T_k`` the target exit of exit ``k`` (``target: top``: ``top``; ``above``: the next exit
    up) and ``sg`` stop-gradient::

        L_teacher = d(e_top, f_t)                                   (top exit <- teacher)
        L_exit_k  = d(e_k, sg(e_{T_k}))                             (each lower exit)

        d = 1 - cos (cosine) | ||.||^2 (mse), averaged over the batch's texts, or
        d = (1/B) sum_i KL(softmax_j(sg(s^T)_ij / tau) || softmax_j(s^k_ij / tau))   (listwise)

    with ``s^k_ij = <e_k(q_i), e_k(p_j)>`` over every passage ``j`` of the global batch
    (BGE-M3's form up to the target's entropy, a constant: the KL is 0 when matched).
    Targets are detached, so a lower exit never pulls the upper blocks towards itself.
    Returns ``"teacher"`` (times ``teacher_weight``; absent when it is 0, e.g. when an
    ``embed`` distiller already teaches the top exit) and ``"exit<k>"`` per exit.

    Args:
        weight: multiplier of every term.
        exits: the lower exits, block indices below the student's last block.
        loss: "cosine" | "mse" (embedding alignment, any text stream) or "listwise" (score
            distributions; needs query/passage tuples: ``data.stream=tuples`` or ``both``).
        target: "top" (every exit learns from the whole model) or "above" (from the next exit).
        teacher_weight: weight of the top exit's term against the teacher.
        temperature: tau of the listwise form (cosine scores / tau).
        fields: text fields aligned by cosine/mse (None: every field the batch has).
    """

    def __init__(self, weight: float = 1.0, exits: Sequence[int] = (0,), loss: str = "cosine", target: str = "top",
                 teacher_weight: float = 1.0, temperature: float = 0.05, fields: Sequence[str] | None = None):
        super().__init__(weight)
        if loss not in LOSSES:
            raise KdkitError(f"multi_exit.loss={loss!r}: use one of {', '.join(LOSSES)}")
        if target not in TARGETS:
            raise KdkitError(f"multi_exit.target={target!r}: use one of {', '.join(TARGETS)}")
        self.exits = sorted({int(k) for k in exits or ()})
        if not self.exits or self.exits[0] < 0:
            raise KdkitError(f"multi_exit.exits={list(exits or [])}: give block indices >= 0, e.g. [0, 1]")
        bad = [f for f in fields or () if f not in FIELDS]
        if bad:
            raise KdkitError(f"multi_exit.fields {bad} unknown: use some of {', '.join(FIELDS)}")
        if temperature <= 0:
            raise KdkitError("multi_exit.temperature must be > 0")
        self.loss, self.target = loss, target
        self.teacher_weight = float(teacher_weight)
        self.temperature = float(temperature)
        self.fields = list(fields) if fields else None

    @property
    def student_features(self) -> list[str]:
        fields = ("query", "passage") if self.loss == "listwise" else (self.fields or FIELDS)
        return [layer_feature(f, k) for f in fields for k in self.exits]

    def build(self, student: Outputs, teacher: Outputs, context) -> None:
        model = context.models.get("student")
        depth = getattr(model, "num_layers", None)
        if depth is not None and self.exits[-1] >= depth - 1:
            raise KdkitError(f"multi_exit.exits={self.exits}: the student has blocks 0..{depth - 1} and block "
                             f"{depth - 1} is the top exit (the model's output): list lower blocks only")
        self._fields(student)  # a clear error now, not at the first step
        if self.teacher_weight:
            for s, t in zip(self._stack(student, None), self._stack(teacher, None)):
                check_same_shape(s, t, "multi_exit", " (set the student's projection_dim to the teacher's width)")

    def _fields(self, outputs: Outputs) -> list[str]:
        if self.loss == "listwise":
            if "query" not in outputs.features or "passage" not in outputs.features:
                raise KdkitError("multi_exit.loss=listwise needs (query, passages) tuples: "
                                 "data.stream=tuples or both")
            return ["query", "passage"]
        names = self.fields or [f for f in FIELDS if f in outputs.features]
        missing = [f for f in names if f not in outputs.features]
        if missing or not names:
            raise KdkitError(f"multi_exit needs text fields {missing or list(FIELDS)} that this batch lacks")
        return names

    def _stack(self, outputs: Outputs, exit: int | None) -> list[Tensor]:
        """The embeddings of exit ``exit`` (None: the top), one tensor per field."""
        names = self._fields(outputs)
        return [feature(outputs, f if exit is None else layer_feature(f, exit), "multi_exit") for f in names]

    def _term(self, student: list[Tensor], target: list[Tensor]) -> Tensor:
        """``d(student, target)`` (student targets come in detached)."""
        if self.loss == "listwise":
            (sq, sp), (tq, tp) = student, target
            s_all, _ = gather(sp.reshape(-1, sp.shape[-1]))
            t_all = gather_nograd(tp.reshape(-1, tp.shape[-1]).float())
            return listwise_kl(sq, s_all, tq, t_all, self.temperature)
        s = torch.cat([x.reshape(-1, x.shape[-1]) for x in student])
        t = torch.cat([x.reshape(-1, x.shape[-1]) for x in target])
        return embedding_loss(s, t, self.loss)

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        if self.teacher_weight:
            terms["teacher"] = self.teacher_weight * self._term(self._stack(student, None),
                                                                self._stack(teacher, None))
        for i, k in enumerate(self.exits):
            above = None if self.target == "top" or i + 1 == len(self.exits) else self.exits[i + 1]
            target = [t.detach() for t in self._stack(student, above)]
            terms[f"exit{k}"] = self._term(self._stack(student, k), target)
        return terms

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, exits={self.exits}, loss={self.loss}, target={self.target}, "
                f"teacher_weight={self.teacher_weight}")
