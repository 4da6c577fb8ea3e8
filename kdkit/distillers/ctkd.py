"""Curriculum temperature for KD: a learnable temperature trained adversarially."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kdkit.distillers.base import Distiller, check_same_shape, require
from kdkit.distillers.kd import kd_loss
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``-lambda`` (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x: Tensor, lam: float) -> Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return -ctx.lam * grad, None


class GlobalTemperature(nn.Module):
    """One learnable scalar ``theta`` (initialised to 1) behind a gradient reversal layer, mapped
    into ``(t_start, t_start + t_range)`` by ``tau = t_start + t_range * sigmoid(theta)``."""

    def __init__(self, t_start: float, t_range: float):
        super().__init__()
        self.t_start, self.t_range = float(t_start), float(t_range)
        self.theta = nn.Parameter(torch.ones(()))

    def forward(self, lam: float) -> Tensor:
        return self.t_start + self.t_range * torch.sigmoid(_ReverseGradient.apply(self.theta, lam))


class CTKD(Distiller):
    """Curriculum Temperature for Knowledge Distillation (Li, Li, Yang, Cheng, Yang & Zhang,
    AAAI 2023), global-temperature variant, on vanilla KD.

        tau = t_start + t_range * sigmoid(GRL_lambda(theta))
        L   = tau^2 * (1/B) sum_i KL( softmax(z^t_i / tau) || softmax(z^s_i / tau) )

    The student minimises L; the gradient reversal layer makes ``theta`` *maximise* it, scaled by
    ``lambda``, which grows along a cosine curriculum over epochs (easy to hard):

        lambda(e) = lambda_min + (lambda_max - lambda_min) * (1 - cos(pi * min(e + 1, E) / E)) / 2

    with ``e`` the 0-based training epoch read from ``self.progress`` (the reference loop counts
    epochs from 1, hence ``e + 1``) and ``E = curriculum_epochs``. ``tau^2`` uses the learnable
    ``tau`` as in the reference code, so its gradient also reaches ``theta``. Returns ``"loss"``.

    Differences: only the global (one scalar) temperature module; the instance-wise MLP variant
    and CTKD on top of other distillers are not implemented (compose ``ctkd`` with them instead,
    which adds its KD term rather than changing their temperature).

    Args:
        weight: multiplier of the loss (reference CIFAR-100: 0.9, with CE weight 0.1).
        t_start: lower bound of the temperature (reference: 1).
        t_range: width of the temperature range (reference ``t_end``: 20, so tau in (1, 21)).
        lambda_max: reversal strength at the end of the curriculum (reference: 1).
        lambda_min: reversal strength at its start (reference: 0).
        curriculum_epochs: epochs of the cosine ramp ``E`` (reference: 10).
    """

    def __init__(self, weight: float = 0.9, t_start: float = 1.0, t_range: float = 20.0,
                 lambda_max: float = 1.0, lambda_min: float = 0.0, curriculum_epochs: int = 10):
        super().__init__(weight)
        if t_start <= 0 or t_range < 0:
            raise KdkitError(f"ctkd needs t_start > 0 and t_range >= 0, got {t_start} and {t_range}")
        if curriculum_epochs < 1:
            raise KdkitError(f"ctkd.curriculum_epochs must be >= 1, got {curriculum_epochs}")
        self.lambda_max, self.lambda_min = float(lambda_max), float(lambda_min)
        self.curriculum_epochs = int(curriculum_epochs)
        self.temperature = GlobalTemperature(t_start, t_range)

    def reversal_strength(self, epoch: int) -> float:
        """``lambda`` of the cosine curriculum at the 0-based ``epoch``."""
        done = min(epoch + 1, self.curriculum_epochs) / self.curriculum_epochs
        return self.lambda_min + (self.lambda_max - self.lambda_min) * (1 - math.cos(math.pi * done)) / 2

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        s = require(student, "logits", "ctkd")
        t = require(teacher, "logits", "ctkd")
        check_same_shape(s, t, "ctkd logits")
        tau = self.temperature(self.reversal_strength(self.progress[0])).float()
        return {"loss": kd_loss(s, t, tau)}

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, lambda=[{self.lambda_min}, {self.lambda_max}] over "
                f"{self.curriculum_epochs} epochs")
