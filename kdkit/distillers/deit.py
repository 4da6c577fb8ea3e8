"""DeiT: a vision transformer's distillation token learns the teacher's prediction."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdkit.distillers.base import DistillContext, Distiller, feature, require
from kdkit.distillers.kd import kd_loss
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

MODES = ("hard", "soft")


def check_mode(mode: str, who: str) -> str:
    """``mode`` if it is one of ``MODES``; a clear error otherwise."""
    if mode not in MODES:
        raise KdkitError(f"{who}.mode must be one of {list(MODES)}, got {mode!r}")
    return str(mode)


def check_temperature(temperature: float, who: str) -> float:
    if not temperature > 0:
        raise KdkitError(f"{who}.temperature must be > 0, got {temperature}")
    return float(temperature)


def deit_loss(dist_logits: Tensor, teacher_logits: Tensor, mode: str = "hard",
              temperature: float = 3.0, label_smoothing: float = 0.0) -> Tensor:
    """The distillation component of DeiT's objective (Touvron et al. 2021, eqs. 2-3), float32.

        soft:  tau^2 (1/B) sum_i KL( psi(Z_t,i / tau) || psi(Z_dist,i / tau) )
        hard:  (1/B) sum_i L_CE( psi(Z_dist,i), y_t,i ),   y_t = argmax_c Z_t(c)

    With ``label_smoothing`` ``eps`` the hard target puts ``1 - eps + eps/K`` on ``y_t`` and
    ``eps/K`` on every other class (PyTorch's and timm's convention).

    Args:
        dist_logits: ``Z_dist`` ``[B, K]``, the logits of the student's distillation head.
        teacher_logits: ``Z_t`` ``[B, K]``.
        mode: ``"soft"`` or ``"hard"``.
        temperature: ``tau`` of the soft mode.
        label_smoothing: ``eps`` of the hard mode.
    """
    if mode == "soft":
        return kd_loss(dist_logits, teacher_logits, temperature)
    target = teacher_logits.argmax(dim=1)
    return F.cross_entropy(dist_logits.float(), target, label_smoothing=label_smoothing)


def teach_distillation_head(context: DistillContext) -> None:
    """Tell a student that says it can be told (kdkit's ``DistilledViT``) that a distiller trains
    its distillation head on the teacher, so that its training output is the class head alone
    (the task's cross-entropy then trains the class head, as in the paper)."""
    switch = getattr(context.models.get("student"), "train_distillation_head", None)
    if callable(switch):
        switch(True)


def distillation_logits(student: Outputs, teacher: Outputs, name: str, who: str) -> tuple[Tensor, Tensor]:
    """The student's feature ``name`` and the teacher's logits, checked to be logits ``[B, K]``
    of the same ``K`` (a clear error naming both shapes otherwise)."""
    s = feature(student, name, who)
    t = require(teacher, "logits", who)
    if s.dim() != 2 or s.shape != t.shape:
        raise KdkitError(
            f"{who}: student feature {name!r} has shape {tuple(s.shape)} and the teacher's logits "
            f"{tuple(t.shape)}: it must be the distillation head's logits [B, K] with the teacher's "
            f"K={t.shape[-1]} classes (a timm DeiT student: head_dist)")
    return s, t


class DeiT(Distiller):
    """DeiT distillation through attention (Touvron et al., "Training data-efficient image
    transformers & distillation through attention", ICML 2021, Sec. 4).

    The student carries a distillation token next to its class token; its output embedding is
    classified by its own head (timm: ``head_dist``), whose logits ``Z_dist`` are trained on the
    teacher while the class head trains on the labels:

        soft:  L = (1 - lambda) L_CE(psi(Z_s), y) + lambda tau^2 KL(psi(Z_t / tau) || psi(Z_dist / tau))
        hard:  L = 1/2 L_CE(psi(Z_s), y) + 1/2 L_CE(psi(Z_dist), y_t),  y_t = argmax_c Z_t(c)

    This distiller returns the distillation term only, read from the distillation head
    (``student_feature``), never from the class head; the task's cross-entropy on
    ``Outputs.logits`` (the class head, in training) is the other term. So ``weight`` is
    ``lambda`` and ``task.task_loss_weight`` is ``1 - lambda``: the paper's values are
    ``lambda = 0.1, tau = 3`` for soft distillation and ``1/2, 1/2`` for hard distillation (its
    default, which it found better). Hard labels can be smoothed (``label_smoothing``; the paper
    notes it, with ``eps = 0.1`` on true labels; the authors' code does not smooth the teacher's).

    At inference the paper fuses the two heads (late fusion of their softmax outputs); kdkit's
    ``DistilledViT`` (``kdkit.models.vit.vit(..., distillation_token=True)``) averages their
    logits in eval mode, which is the student model's business, not this distiller's.

    Departure: the soft term is the paper's equation, a KL averaged over the batch; the authors'
    code divides the summed KL by ``B * K`` instead (use ``weight = lambda / K`` to match it).
    Returns the single term ``"loss"``.

    Args:
        weight: ``lambda`` (hard: 0.5, soft: 0.1 in the paper), with ``task.task_loss_weight``
            set to ``1 - lambda`` by the experiment.
        mode: ``"hard"`` (teacher's argmax as label) or ``"soft"`` (KL at temperature ``tau``).
        temperature: ``tau`` of the soft mode (the paper: 3).
        label_smoothing: ``eps`` on the teacher's hard label, in [0, 1).
        student_feature: student module whose output are the distillation head's logits
            ``[B, K]`` (timm ``VisionTransformerDistilled`` / kdkit ``DistilledViT``: ``head_dist``).
    """

    def __init__(self, weight: float = 0.5, mode: str = "hard", temperature: float = 3.0,
                 label_smoothing: float = 0.0, student_feature: str = "head_dist"):
        super().__init__(weight)
        self.mode = check_mode(mode, "deit")
        self.temperature = check_temperature(temperature, "deit")
        if not 0 <= label_smoothing < 1:
            raise KdkitError(f"deit.label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        self.student_feature = str(student_feature)

    @property
    def student_features(self) -> list[str]:
        return [self.student_feature]

    def build(self, student: Outputs, teacher: Outputs, context: DistillContext) -> None:
        distillation_logits(student, teacher, self.student_feature, "deit")
        teach_distillation_head(context)

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        s, t = distillation_logits(student, teacher, self.student_feature, "deit")
        return {"loss": deit_loss(s, t, self.mode, self.temperature, self.label_smoothing)}

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, mode={self.mode!r}, temperature={self.temperature}, "
                f"label_smoothing={self.label_smoothing}, student_feature={self.student_feature!r}")
