"""Decoupled knowledge distillation: target-class and non-target-class parts of KD, reweighted."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.distillers.base import Distiller, check_same_shape, require
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs


def _binary_log_probs(z: Tensor, target_mask: Tensor) -> Tensor:
    """``[log p_target, log (1 - p_target)]`` per row of logits ``z``, without cancellation."""
    log_total = torch.logsumexp(z, dim=1)
    log_target = z.masked_fill(~target_mask, float("-inf")).logsumexp(dim=1)
    log_other = z.masked_fill(target_mask, float("-inf")).logsumexp(dim=1)
    return torch.stack([log_target - log_total, log_other - log_total], dim=1)


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``mean_i KL(p_i || q_i)`` from log-probabilities."""
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def dkd_terms(student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
              temperature: float) -> tuple[Tensor, Tensor]:
    """Unweighted ``(TCKD, NCKD)``, each scaled by ``T^2`` and averaged over the batch (float32).

    TCKD = KL(b^t || b^s) over the binary distribution b = [p_target, 1 - p_target];
    NCKD = KL(p~^t || p~^s) over the softmax of the non-target logits alone (C - 1 classes).
    """
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    batch, classes = s.shape
    target_mask = F.one_hot(target.long(), classes).bool()
    tckd = _kl_rows(_binary_log_probs(t, target_mask), _binary_log_probs(s, target_mask))
    # Dropping the target column (row-major boolean indexing keeps each row's order) gives the
    # non-target distribution exactly, where mdistiller subtracts 1000 from the target logit.
    s_other = s[~target_mask].view(batch, classes - 1)
    t_other = t[~target_mask].view(batch, classes - 1)
    nckd = _kl_rows(F.log_softmax(t_other, dim=1), F.log_softmax(s_other, dim=1))
    return tckd * temperature**2, nckd * temperature**2


class DKD(Distiller):
    """Decoupled Knowledge Distillation (Zhao et al., CVPR 2022).

    KD splits into a target-class term and a non-target term, KD = TCKD + (1 - p^t_target) NCKD;
    DKD drops the coupling factor and weights the two freely:

        L_DKD = w(step) * ( alpha * TCKD + beta * NCKD ),   both at temperature T, times T^2

    with the binary distributions b = [p_target, 1 - p_target] (TCKD) and the softmax over the
    non-target classes only (NCKD). Defaults are mdistiller's CIFAR-100 ones (alpha=1, beta=8,
    T=4). Returns the terms ``"tckd"`` (= w * alpha * TCKD) and ``"nckd"`` (= w * beta * NCKD).

    Warm-up: mdistiller scales the loss by ``min(epoch / 20, 1)``. Here
    ``w = min(step / warmup_steps, 1)``, where ``step`` counts forward calls made in training
    mode (this one included; with gradient accumulation every micro-batch counts). ``step``
    is a persistent buffer, so a resumed run continues the ramp where it stopped.

    Needs ``batch["label"]`` (the ground-truth class).

    Args:
        weight: multiplier of both terms (mdistiller: 1.0 with the task's cross-entropy at 1.0).
        alpha: weight of TCKD.
        beta: weight of NCKD.
        temperature: softmax temperature ``T`` (> 0).
        warmup_steps: training steps of the linear warm-up of the DKD loss (0: none).
    """

    reads_labels = True  # the target class of each row

    def __init__(self, weight: float = 1.0, alpha: float = 1.0, beta: float = 8.0,
                 temperature: float = 4.0, warmup_steps: int = 0):
        super().__init__(weight)
        if temperature <= 0:
            raise KdkitError(f"dkd.temperature must be > 0, got {temperature}")
        if warmup_steps < 0:
            raise KdkitError(f"dkd.warmup_steps must be >= 0, got {warmup_steps}")
        self.alpha, self.beta = float(alpha), float(beta)
        self.temperature = float(temperature)
        self.warmup_steps = int(warmup_steps)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def warmup_factor(self) -> Tensor | float:
        """``min(step / warmup_steps, 1)``, kept on the device (no host sync per step)."""
        if self.warmup_steps == 0:
            return 1.0
        return (self.step.float() / self.warmup_steps).clamp(max=1.0)

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        s = require(student, "logits", "dkd")
        t = require(teacher, "logits", "dkd")
        check_same_shape(s, t, "dkd logits")
        if "label" not in batch:
            raise KdkitError("dkd needs batch['label'] (the target class) but the batch has none")
        if s.shape[1] < 2:
            raise KdkitError(f"dkd needs at least 2 classes, got {s.shape[1]}")
        if self.training:
            self.step += 1
        w = self.warmup_factor()
        tckd, nckd = dkd_terms(s, t, batch["label"], self.temperature)
        return {"tckd": w * self.alpha * tckd, "nckd": w * self.beta * nckd}

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, alpha={self.alpha}, beta={self.beta}, "
                f"temperature={self.temperature}, warmup_steps={self.warmup_steps}")
