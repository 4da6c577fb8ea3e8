"""CSKD: a CNN teacher's per-position predictions supervise a ViT student's patch tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.distillers.base import DistillContext, Distiller, feature, require
from kdkit.distillers.deit import check_mode, check_temperature, deit_loss, distillation_logits, teach_distillation_head
from kdkit.distillers.map_pairs import pool_to_smaller
from kdkit.distillers.token_layout import check_prefix, map_to_tokens, patch_tokens
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

SCHEDULES = ("linear", "square", "cosine")


def ckf_weight(epoch: int, epochs: int, schedule: str = "linear") -> float:
    """``alpha``, the weight of the teacher's dense prediction in Cumulative Knowledge Fusion at
    (0-based) ``epoch`` of ``epochs``; the global prediction gets ``1 - alpha``.

    With ``x = min(epoch / epochs, 1)``: linear ``1 - x`` (the paper), square ``(1 - x)^2``,
    cosine ``cos(pi x / 2)`` (the authors' code's alternatives).
    """
    x = min(max(epoch, 0) / epochs, 1.0)
    if schedule == "linear":
        return 1.0 - x
    if schedule == "square":
        return (1.0 - x) ** 2
    if schedule == "cosine":
        return math.cos(math.pi * x / 2)
    raise KdkitError(f"cskd.schedule must be one of {list(SCHEDULES)}, got {schedule!r}")


def _head_input(x: Tensor, head: nn.Module) -> Tensor:
    # a teacher run at another precision than its head's weights (teacher.precision) would not
    # multiply; under autocast the matmul is still cast down
    param = next(head.parameters(), None)
    return x if param is None else x.to(param.dtype)


def classify(head: nn.Module, x: Tensor) -> Tensor:
    """``head`` applied to the last dimension of ``x``.

    ``forward`` is called directly so that the model's own forward hooks (kdkit's feature taps of
    that module, e.g. ``head_dist`` or ``fc:input``) do not record these extra calls."""
    return head.forward(_head_input(x, head))


def dense_logits_from_map(feature_map: Tensor, head: nn.Module) -> Tensor:
    """A CNN's dense prediction ``P^T``: ``head`` at every position of ``[B, C, H, W]`` -> ``[B, K, H, W]``."""
    b, _, h, w = feature_map.shape
    return classify(head, map_to_tokens(feature_map)).transpose(1, 2).reshape(b, -1, h, w)


def dense_logits_from_tokens(tokens: Tensor, prefix_tokens: int, grid: tuple[int, int],
                             head: nn.Module) -> Tensor:
    """A ViT's dense prediction ``P^S``: ``head`` on every patch token of ``[B, P + h*w, D]``
    (prefix tokens dropped), laid out as ``[B, K, h, w]``."""
    logits = classify(head, patch_tokens(tokens, prefix_tokens))
    return logits.transpose(1, 2).reshape(tokens.shape[0], -1, grid[0], grid[1])


def cskd_loss(student_dense: Tensor, teacher_dense: Tensor, teacher_global: Tensor, alpha: float,
              mode: str = "hard", temperature: float = 1.0) -> Tensor:
    """``L_CSKD`` between dense predictions ``[B, K, h, w]``, averaged over the batch and the
    positions, float32. Grids that differ meet on the coarser one: the finer prediction is
    average-pooled (``pool_to_smaller``; the authors pool the ViT's 14 x 14 to the CNN's 7 x 7).

        P_CKF = alpha P^T + (1 - alpha) P^T_global        (CKF, at every position)
        hard:  CE(P^S, argmax_c P_CKF)
        soft:  tau^2 KL(psi(P_CKF / tau) || psi(P^S / tau))

    Args:
        student_dense: ``P^S``, the student's per-token logits.
        teacher_dense: ``P^T``, the teacher's per-position logits.
        teacher_global: ``P^T_global`` ``[B, K]``, the teacher's (pooled) prediction.
        alpha: weight of ``P^T`` (``ckf_weight``).
        mode: ``"hard"`` or ``"soft"``.
        temperature: ``tau`` of the soft mode.
    """
    s, t = pool_to_smaller(student_dense.float(), teacher_dense.float())
    fused = alpha * t + (1.0 - alpha) * teacher_global.float()[:, :, None, None]
    if mode == "hard":
        return F.cross_entropy(s, fused.argmax(dim=1))
    b, _, h, w = s.shape
    kl = F.kl_div(F.log_softmax(s / temperature, dim=1), F.log_softmax(fused / temperature, dim=1),
                  reduction="sum", log_target=True)
    return kl * temperature**2 / (b * h * w)


class CSKD(Distiller):
    """Cumulative Spatial Knowledge Distillation (Zhao, Song & Liang, "Cumulative Spatial
    Knowledge Distillation for Vision Transformers", ICCV 2023), for a ViT student and a CNN
    teacher.

    Spatial knowledge without intermediate features: the CNN's classifier applied at every
    position of its last feature map (before global pooling) gives a dense prediction ``P^T``
    ``[H, W, K]``; the ViT's classifier applied to every final patch token gives ``P^S``. The
    finer of the two grids is average-pooled to the coarser. Cumulative Knowledge Fusion (CKF)
    mixes in the CNN's global prediction ``P^T_global`` (its logits) with a weight growing over
    training, so the local inductive bias guides early training and the global response late:

        Y^T = argmax_c( alpha P^T + (1 - alpha) P^T_global ),   alpha = 1 - epoch / epochs
        L_CSKD = CE(P^S, Y^T)      (averaged over the batch and the positions)

    The paper's objective is ``L = 1/2 L_CE + 1/2 L_distill + L_CSKD``, with ``L_distill`` DeiT's
    hard distillation of the distillation token (``kdkit.distillers.deit``). The returned terms
    are ``"dense"`` (``L_CSKD``) and ``"distill"`` (``distill_weight * L_distill``, absent when
    ``distill_feature`` is null); with ``weight: 1``, ``distill_weight: 0.5`` and
    ``task.task_loss_weight: 0.5`` the total is the paper's. Following the authors' code, the
    patch tokens are classified by the distillation head (``head_dist``), the one the
    distillation token uses; a ViT without distillation token uses its class head (``head``).
    The student's head thus learns from the patch-token term; the teacher's head is the
    teacher's, frozen, and neither is registered in (or saved with) this distiller.

    Departures: ``P^T_global`` is the teacher's logits (the authors average its dense logits,
    the same thing for a linear head after global average pooling); soft mode (an alternative
    the authors' code offers) averages the KL over positions, where their code sums it; their
    inference also averages the patch tokens' mean prediction into the output, which kdkit's
    ``DistilledViT`` does not (it averages the class and distillation heads).

    Args:
        weight: multiplier of both terms (the paper: 1).
        epochs: total training epochs of the student, over which ``alpha`` goes from 1 to 0
            (the yaml reads ``trainer.max_epochs``).
        student_tokens: student module whose output are the final normalised tokens
            ``[B, P + h*w, D]`` (timm: ``norm``).
        student_prefix_tokens: ``P``, tokens ahead of the patch tokens (1: CLS, 2: CLS +
            distillation token).
        student_head: student classifier applied to every patch token (``head_dist``; ``head``
            for a ViT without distillation token).
        teacher_feature: teacher module whose output is its last feature map ``[B, C, H, W]``
            before global pooling (kdkit's CIFAR ResNets: ``layer3``).
        teacher_head: teacher classifier applied at every position (kdkit's CIFAR ResNets: ``fc``).
        mode: ``"hard"`` (the paper: the fused prediction's argmax as label) or ``"soft"``; also
            the mode of the ``distill`` term.
        temperature: ``tau`` of the soft mode (the authors: 1).
        schedule: decay of ``alpha``: ``"linear"`` (the paper), ``"square"`` or ``"cosine"``.
        distill_feature: student module giving the distillation token's logits for the paper's
            ``L_distill`` (``head_dist``); null: no such term (a plain ViT, or next to the
            ``deit`` distiller).
        distill_weight: multiplier of ``L_distill`` inside this distiller (the paper: 1/2).
    """

    def __init__(self, weight: float = 1.0, epochs: int | None = None, student_tokens: str = "norm",
                 student_prefix_tokens: int | None = 2, student_head: str = "head_dist",
                 teacher_feature: str = "layer3", teacher_head: str = "fc", mode: str = "hard",
                 temperature: float = 1.0, schedule: str = "linear",
                 distill_feature: str | None = "head_dist", distill_weight: float = 0.5):
        super().__init__(weight)
        if isinstance(epochs, bool) or epochs is None or int(epochs) != epochs or epochs < 1:
            raise KdkitError(f"cskd.epochs must be the student's total training epochs (a whole "
                             f"number >= 1; the CKF weight runs over them), got {epochs!r}")
        self.epochs = int(epochs)
        self.student_tokens = str(student_tokens)
        self.prefix_tokens = None if student_prefix_tokens is None else int(student_prefix_tokens)
        self.student_head = str(student_head)
        self.teacher_feature = str(teacher_feature)
        self.teacher_head = str(teacher_head)
        self.mode = check_mode(mode, "cskd")
        self.temperature = check_temperature(temperature, "cskd")
        ckf_weight(0, 1, schedule)  # an unknown schedule fails here, not at the first step
        self.schedule = str(schedule)
        self.distill_feature = None if distill_feature is None else str(distill_feature)
        if not distill_weight >= 0:
            raise KdkitError(f"cskd.distill_weight must be >= 0, got {distill_weight}")
        self.distill_weight = float(distill_weight)
        # (student head, teacher head): the models' modules, kept out of this module's registration
        self._heads: tuple[nn.Module, nn.Module] | None = None

    @property
    def student_features(self) -> list[str]:
        return [self.student_tokens] + ([self.distill_feature] if self.distill_feature else [])

    @property
    def teacher_features(self) -> list[str]:
        return [self.teacher_feature]

    def alpha(self) -> float:
        """The CKF weight of the teacher's dense prediction at the current epoch."""
        return ckf_weight(self.progress[0], self.epochs, self.schedule)

    def _dense(self, student: Outputs, teacher: Outputs) -> tuple[Tensor, Tensor]:
        tokens = feature(student, self.student_tokens, "cskd")
        grid = check_prefix(tokens.shape, self.prefix_tokens, "cskd", "student", self.student_tokens)
        fmap = feature(teacher, self.teacher_feature, "cskd")
        if fmap.dim() != 4:
            raise KdkitError(
                f"cskd: teacher feature {self.teacher_feature!r} has shape {tuple(fmap.shape[1:])}, not a "
                "map [C, H, W]: name the teacher's last feature map before global pooling "
                "(kdkit's CIFAR ResNets: layer3)")
        s_head, t_head = self._heads
        s_dense = self._dense_of("student", lambda: dense_logits_from_tokens(tokens, self.prefix_tokens, grid, s_head))
        with torch.no_grad():
            t_dense = self._dense_of("teacher", lambda: dense_logits_from_map(fmap, t_head))
        return s_dense, t_dense

    def _dense_of(self, role: str, fn) -> Tensor:
        try:
            return fn()
        except RuntimeError as err:  # a head of the wrong width for the tokens / the map
            head, name = ((self.student_head, self.student_tokens) if role == "student"
                          else (self.teacher_head, self.teacher_feature))
            raise KdkitError(f"cskd: the {role} head {head!r} cannot classify the positions of "
                             f"{name!r}: {err}") from None

    def build(self, student: Outputs, teacher: Outputs, context: DistillContext) -> None:
        self._heads = (context.module("student", self.student_head, "cskd"),
                       context.module("teacher", self.teacher_head, "cskd"))
        s_dense, t_dense = self._dense(student, teacher)
        logits = require(teacher, "logits", "cskd")
        classes = {"student head": s_dense.shape[1], "teacher head": t_dense.shape[1],
                   "teacher logits": logits.shape[-1]}
        if len(set(classes.values())) != 1:
            raise KdkitError(f"cskd: the dense predictions must have the teacher's classes, got "
                             f"{classes} (student_head={self.student_head!r}, teacher_head={self.teacher_head!r})")
        if self.distill_feature:
            distillation_logits(student, teacher, self.distill_feature, "cskd")
            teach_distillation_head(context)

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        if self._heads is None:
            raise RuntimeError("cskd: build() must run (on a probe forward) before forward()")
        s_dense, t_dense = self._dense(student, teacher)
        t_global = require(teacher, "logits", "cskd")
        terms = {"dense": cskd_loss(s_dense, t_dense, t_global, self.alpha(), self.mode, self.temperature)}
        if self.distill_feature:
            s, t = distillation_logits(student, teacher, self.distill_feature, "cskd")
            terms["distill"] = self.distill_weight * deit_loss(s, t, self.mode, self.temperature)
        return terms

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, epochs={self.epochs}, student_tokens={self.student_tokens!r}, "
                f"student_prefix_tokens={self.prefix_tokens}, student_head={self.student_head!r}, "
                f"teacher_feature={self.teacher_feature!r}, teacher_head={self.teacher_head!r}, "
                f"mode={self.mode!r}, temperature={self.temperature}, schedule={self.schedule!r}, "
                f"distill_feature={self.distill_feature!r}, distill_weight={self.distill_weight}")
