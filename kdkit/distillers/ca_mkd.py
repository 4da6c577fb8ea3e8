"""Confidence-aware multi-teacher KD: per-sample teacher weights from each teacher's
cross-entropy on the label."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.distillers.base import MultiTeacherDistiller, check_same_shape, read_teachers, require
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs


def confidence_weights(teacher_logits: list[Tensor], labels: Tensor, labelled: Tensor | None = None) -> Tensor:
    """``w [K, B]``: ``w_k,i = (1 - softmax_k(CE_k,i)) / (K - 1)`` with ``CE_k,i`` teacher k's
    cross-entropy on sample i's label; each column sums to 1. Samples where ``labelled`` is
    False get ``1 / K`` (no label to judge the teachers by)."""
    k = len(teacher_logits)
    if k == 1:
        return torch.ones(1, labels.shape[0], device=labels.device)
    safe = labels.clamp(min=0)
    ce = torch.stack([F.cross_entropy(t.float(), safe, reduction="none") for t in teacher_logits])
    w = (1.0 - F.softmax(ce, dim=0)) / (k - 1)
    if labelled is not None:
        w = torch.where(labelled.bool().unsqueeze(0), w, torch.full_like(w, 1.0 / k))
    return w.detach()


def ca_mkd_loss(student_logits: Tensor, teacher_logits: list[Tensor], weights: Tensor,
                temperature: float) -> Tensor:
    """``T^2 * (1/B) sum_i sum_k w_k,i KL(softmax(z^k_i / T) || softmax(z^s_i / T))`` (float32)."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    kl = torch.stack([
        F.kl_div(log_p_s, F.log_softmax(t.float() / temperature, dim=1), reduction="none",
                 log_target=True).sum(1)
        for t in teacher_logits])  # [K, B]
    return (weights * kl).sum(0).mean() * temperature**2


class CAMKD(MultiTeacherDistiller):
    """The logit part of CA-MKD (Zhang, Chen & Wang, "Confidence-Aware Multi-Teacher Knowledge
    Distillation", ICASSP 2022): each teacher's soft targets are weighted per sample by how well
    that teacher predicts the sample's label, so a teacher that is wrong on a sample teaches
    less there.

        w^k_i = (1 - exp(L^k_CE,i) / sum_j exp(L^j_CE,i)) / (K - 1)
        L = T^2 * (1/B) sum_i sum_k w^k_i KL(softmax(z^k_i / T) || softmax(z^s_i / T))

    The paper's intermediate-feature term (confidence-weighted feature regression) is not part
    of this distiller; combine with a feature distiller per teacher if wanted.

    Args:
        weight: multiplier of the loss.
        teachers: names of the teachers combined (None: every teacher of the run).
        temperature: softmax temperature ``T`` (> 0).
        label_key: the batch key of the labels ("label" for images, "y" for graphs).
        mask_key: batch key of a boolean mask of the samples whose labels may be read (graphs:
            "train_mask", so validation and test labels never weight the teachers); others get
            equal weights. None: every label is a training label.
    """

    needs_several_teachers = True  # refused where only one teacher exists (born-again)

    def __init__(self, weight: float = 1.0, teachers=None, temperature: float = 4.0,
                 label_key: str = "label", mask_key: str | None = None):
        super().__init__(weight, teachers)
        if temperature <= 0:
            raise KdkitError(f"ca_mkd.temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.label_key = label_key
        self.mask_key = mask_key

    def build(self, student: Outputs, teachers: dict[str, Outputs], context) -> None:
        read_teachers(teachers, "ca_mkd", at_least=2)
        s = require(student, "logits", "ca_mkd")
        for name, t in teachers.items():
            check_same_shape(s, require(t, "logits", "ca_mkd"), f"ca_mkd logits of teacher '{name}'")

    def forward(self, student: Outputs, teachers: dict[str, Outputs], batch: dict) -> dict[str, Tensor]:
        if self.label_key not in batch:
            raise KdkitError(f"ca_mkd reads labels from batch[{self.label_key!r}], which this task's "
                             f"batches lack (keys: {sorted(batch)}); set distiller.ca_mkd.label_key")
        logits = [require(t, "logits", "ca_mkd") for t in teachers.values()]
        labelled = batch[self.mask_key] if self.mask_key else None
        weights = confidence_weights(logits, batch[self.label_key], labelled)
        return {"loss": ca_mkd_loss(require(student, "logits", "ca_mkd"), logits, weights, self.temperature)}

    def extra_repr(self) -> str:
        return f"weight={self.weight}, teachers={self.teacher_names or 'all'}, temperature={self.temperature}"
