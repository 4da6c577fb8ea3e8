"""Vanilla knowledge distillation on logits."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdkit.distillers.base import Distiller, check_same_shape, require
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * mean_i KL(softmax(t_i / T) || softmax(s_i / T))``, computed in float32."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature**2


class KD(Distiller):
    """Knowledge distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
    Network", 2015).

        L_KD = T^2 * (1/B) * sum_i KL( softmax(z^t_i / T) || softmax(z^s_i / T) )

    The ``T^2`` factor keeps the gradient scale of the soft targets independent of ``T``
    (Sec. 2 of the paper). Returns the single term ``"loss"``.

    Args:
        weight: multiplier of the loss (RepDistiller/mdistiller on CIFAR: 0.9 with the task's
            cross-entropy weighted 0.1).
        temperature: softmax temperature ``T`` (> 0).
    """

    def __init__(self, weight: float = 1.0, temperature: float = 4.0):
        super().__init__(weight)
        if temperature <= 0:
            raise KdkitError(f"kd.temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        s = require(student, "logits", "kd")
        t = require(teacher, "logits", "kd")
        check_same_shape(s, t, "kd logits")
        return {"loss": kd_loss(s, t, self.temperature)}

    def extra_repr(self) -> str:
        return f"weight={self.weight}, temperature={self.temperature}"
