"""Dual-head KD: a logit-level loss on an auxiliary classifier head, away from the main head."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.distillers.base import DistillContext, Distiller, check_same_shape, require
from kdkit.distillers.kd import kd_loss
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

LOSSES = ("binary_kl_norm", "binary_kl")
HEADS = ("nonlinear", "linear")


def binary_kl_norm(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """BinaryKL-Norm of DHKD: every class is a Bernoulli ``sigma((z^s_c - z^t_c) / T)`` pulled
    to 1/2, ``T^2 / B * sum_{i,c} KL(Bern(1/2) || Bern(sigma(d_ic / T)))`` (float32).

    Per entry ``KL = -log 2 + (softplus(x) + softplus(-x)) / 2`` with ``x = d / T``: the exact
    value of ``1/2 log(1/2 / sigma) + 1/2 log(1/2 / (1 - sigma))`` without clamping sigma.
    """
    x = (student_logits.float() - teacher_logits.float()) / temperature
    per_entry = (F.softplus(x) + F.softplus(-x)) / 2 - math.log(2.0)
    return per_entry.sum() / x.shape[0] * temperature**2


def binary_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """BinaryKL of DHKD: ``T^2 / B * sum_{i,c} KL(Bern(sigma(z^t/T)) || Bern(sigma(z^s/T)))``."""
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    p_t = t.sigmoid()
    # KL = p (log p - log q) + (1 - p) (log(1 - p) - log(1 - q)); log(1 - sigma(x)) = logsigmoid(-x).
    kl = p_t * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p_t) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return kl.sum() / s.shape[0] * temperature**2


class DHKD(Distiller):
    """Dual-Head Knowledge Distillation (Yang, Zong, Huang, Feng & An, "Dual-Head Knowledge
    Distillation: Enhancing Logits Utilization with an Auxiliary Head", arXiv 2411.08937, 2024;
    v2 2025; code github.com/penghui-yang/DHKD).

    A logit-level loss and the probability-level cross-entropy conflict when they act on the
    same linear classifier (the paper's neural-collapse analysis), but not in the backbone.
    DHKD therefore gives the student a second, auxiliary head ``g`` on its pooled embedding
    ``h`` (``Outputs.embedding``); the main head ``f`` keeps the task's cross-entropy and ``g``
    alone takes the logit-level loss against the teacher's logits ``z^t``:

        L = L_CE(f(h), y)  [the task's loss]  +  L_BinaryKL-Norm(g(h), z^t)
        L_BinaryKL-Norm = T^2 / B * sum_i sum_c KL( Bern(1/2) || Bern(sigma((g(h_i)_c - z^t_ic) / T)) )

    ``loss: binary_kl`` uses the paper's un-normalised BinaryKL instead,
    ``T^2 / B * sum_{i,c} KL(Bern(sigma(z^t_ic / T)) || Bern(sigma(g(h_i)_c / T)))``.
    The auxiliary head is an adapter of this distiller, so it trains with the student and is
    dropped on export: inference uses the main head only. ``g`` is the reference code's CIFAR
    head (``--nonlinear``: Linear(D, 200), Dropout(0.1), BatchNorm1d, ReLU, Linear(200, C)) or
    a single Linear (``head: linear``, its ImageNet setting).

    ``kd_weight > 0`` adds the usual ``T_kd^2 * KL(softmax(z^t/T_kd) || softmax(f(h)/T_kd))``
    on the *main* head as the term ``"kd"`` (same as composing ``distiller=[kd,dhkd]``). The
    paper's DHKD has no such term (main head: cross-entropy only), hence the default 0.

    Deviations: the reference code adds gradient alignment (``--ga``: a PCGrad-style optimizer
    that projects the distillation gradient off the cross-entropy gradient when they conflict);
    that acts on the optimizer and the task loss, which a distiller does not own, so it is not
    implemented. BinaryKL-Norm is computed exactly (softplus form) where the reference clamps
    ``sigma`` to ``[1e-8, 1 - 1e-8]``; they differ only for ``|d| / T > 18``.

    Returns ``"binary_kl"`` (the loss of the auxiliary head) and, with ``kd_weight > 0``,
    ``"kd"`` (already multiplied by ``kd_weight``).

    Args:
        weight: multiplier of the terms (reference CIFAR-100 command: ``-a 1`` with the
            cross-entropy at ``-r 1``).
        temperature: ``T`` of the binary losses (reference ``--BinaryKL_T 2``).
        loss: "binary_kl_norm" (the paper's DHKD loss) or "binary_kl".
        head: "nonlinear" (reference CIFAR) or "linear" (reference ImageNet) auxiliary head.
        hidden: width of the nonlinear head's hidden layer (reference: 200).
        dropout: dropout of the nonlinear head (reference: 0.1).
        kd_weight: weight of an extra KD term on the main head (0: none, as in the paper).
        kd_temperature: temperature of that KD term.
    """

    def __init__(self, weight: float = 1.0, temperature: float = 2.0, loss: str = "binary_kl_norm",
                 head: str = "nonlinear", hidden: int = 200, dropout: float = 0.1,
                 kd_weight: float = 0.0, kd_temperature: float = 4.0):
        super().__init__(weight)
        if loss not in LOSSES:
            raise KdkitError(f"dhkd.loss must be one of {LOSSES}, got {loss!r}")
        if head not in HEADS:
            raise KdkitError(f"dhkd.head must be one of {HEADS}, got {head!r}")
        if temperature <= 0 or kd_temperature <= 0 or hidden < 1 or not 0 <= dropout < 1 or kd_weight < 0:
            raise KdkitError(
                "dhkd: need temperature > 0, kd_temperature > 0, hidden >= 1, 0 <= dropout < 1, "
                f"kd_weight >= 0; got temperature={temperature}, kd_temperature={kd_temperature}, "
                f"hidden={hidden}, dropout={dropout}, kd_weight={kd_weight}"
            )
        self.temperature, self.loss, self.head_kind = float(temperature), loss, head
        self.hidden, self.dropout = int(hidden), float(dropout)
        self.kd_weight, self.kd_temperature = float(kd_weight), float(kd_temperature)
        self.aux_head: nn.Module | None = None

    def build(self, student: Outputs, teacher: Outputs, context: DistillContext) -> None:
        h = require(student, "embedding", "dhkd").flatten(1)
        z_t = require(teacher, "logits", "dhkd")
        if z_t.dim() != 2:
            raise KdkitError(f"dhkd needs teacher logits [B, C], got shape {tuple(z_t.shape)}")
        if self.kd_weight > 0:
            check_same_shape(require(student, "logits", "dhkd"), z_t, "dhkd logits")
        d, c = h.shape[1], z_t.shape[1]
        if self.head_kind == "linear":
            self.aux_head = nn.Linear(d, c)
        else:
            self.aux_head = nn.Sequential(nn.Linear(d, self.hidden), nn.Dropout(self.dropout),
                                          nn.BatchNorm1d(self.hidden), nn.ReLU(),
                                          nn.Linear(self.hidden, c))
        self.aux_head.to(h.device)

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        if self.aux_head is None:
            raise RuntimeError("dhkd: build() must run (on a probe forward) before forward()")
        h = require(student, "embedding", "dhkd").flatten(1)
        z_t = require(teacher, "logits", "dhkd")
        aux = self.aux_head(h)
        check_same_shape(aux, z_t, "dhkd auxiliary-head logits")
        fn = binary_kl_norm if self.loss == "binary_kl_norm" else binary_kl
        terms = {"binary_kl": fn(aux, z_t, self.temperature)}
        if self.kd_weight > 0:
            z_s = require(student, "logits", "dhkd")
            check_same_shape(z_s, z_t, "dhkd logits")
            terms["kd"] = self.kd_weight * kd_loss(z_s, z_t, self.kd_temperature)
        return terms

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, temperature={self.temperature}, loss={self.loss!r}, "
                f"head={self.head_kind!r}, kd_weight={self.kd_weight}")
