"""OFA-KD: intermediate student stages projected into the logit space by small branch heads, each
trained on the teacher's logits with an adaptively target-enhanced KD loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.distillers.base import DistillContext, Distiller, check_same_shape, feature, require
from kdkit.distillers.ofa_branches import BRANCHES, TOKEN_POOLS, make_branches
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

VARIANTS = ("paper", "official")


def ofa_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, gamma: float = 1.0,
             temperature: float = 1.0, variant: str = "paper") -> Tensor:
    """The OFA loss of Hao et al. (NeurIPS 2023), averaged over the batch, in float32.

    With ``p = softmax(z / T)`` of each side and ``c_hat`` the ground-truth class of a sample:

        paper:    L = -(1 + p^t_c_hat)^gamma log p^s_c_hat - sum_{c != c_hat} p^t_c log p^s_c
        official: L = -((1 + p^t_c_hat)^gamma - 1) log p^s_c_hat - sum_{c != c_hat} (p^t_c)^gamma log p^s_c

    ``paper`` is the paper's equation: at ``gamma = 1`` it is cross-entropy with the label plus
    cross-entropy with the teacher's distribution (CE + KD at T = 1, up to the teacher's
    entropy); ``gamma > 1`` enlarges the target class's weight more the more confident the
    teacher is. ``official`` is what the authors' code computes (``((p^t + y)^gamma - y)`` as
    the soft target, ``y`` the one-hot label): the label's own cross-entropy is left to the task
    loss, and the non-target probabilities are raised to ``gamma`` too; at ``gamma = 1`` it is
    cross-entropy with the teacher's distribution. The teacher side carries no gradient. Like
    the authors' code, a temperature ``T != 1`` divides both sides' logits with no ``T^2`` factor.

    Args:
        student_logits: ``[B, K]``.
        teacher_logits: ``[B, K]``.
        target: ground-truth classes, long ``[B]``.
        gamma: the modulating exponent (>= 0; the paper's ``gamma``, the code's ``ofa_eps``).
        temperature: ``T`` (> 0; the paper and the authors' default: 1).
        variant: ``"paper"`` or ``"official"``.
    """
    with torch.autocast(student_logits.device.type, enabled=False):
        log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
        p_t = F.softmax(teacher_logits.detach().float() / temperature, dim=1)
        onehot = F.one_hot(target.long(), p_t.shape[1]).to(p_t.dtype)
        if variant == "paper":
            weights = torch.where(onehot.bool(), (1.0 + p_t) ** gamma, p_t)
        else:
            weights = (p_t + onehot) ** gamma - onehot
        return -(weights * log_p_s).sum(dim=1).mean()


def _per_term(value, count: int, what: str, expected: str) -> list[float]:
    """``value`` (one number, or a list of ``count``) as ``count`` floats."""
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value] * count
    if len(values) != count:
        raise KdkitError(f"ofa.{what} has {len(values)} values {values}; give one number or {count} ({expected})")
    return [float(v) for v in values]


class OFA(Distiller):
    """One-for-All KD (Hao, Guo, Han, Tang, Hu, Wang & Xu, NeurIPS 2023, "One-for-All: Bridge the
    Gap Between Heterogeneous Architectures in Knowledge Distillation").

    Features of heterogeneous networks (CNN, ViT, MLP) differ too much to be regressed onto one
    another, so OFA compares in the one space every classifier shares: the logits. Each tapped
    student stage ``i`` gets a trainable branch ``b_i`` to ``K`` class logits, and each branch,
    and the student's own logits (``final``), learn the teacher's logits ``z^t`` with the OFA loss
    (``ofa_loss``; ``c_hat`` the label):

        L_OFA(z^s) = -(1 + p^t_c_hat)^gamma log p^s_c_hat - sum_{c != c_hat} p^t_c log p^s_c
        stage<i> = w_i * L_OFA(b_i(f_i)),   final = w_final * L_OFA(z^s)

    The teacher is read through its logits only, so any teacher works. Returns one term per
    stage, ``"stage0"``, ``"stage1"``, ... (in the order of ``stages``) and ``"final"`` (with
    ``final``). Needs ``batch["label"]`` (long ``[B]``; a soft ``[B, K]`` label, as mixup or
    smoothing give, counts as its argmax, as in the authors' code).

    As in the paper and the authors' code: one branch per stage (they use all four stages, the
    last included, plus the final logits), ``gamma = 1`` (1.5 for some ImageNet CNN students),
    ``T = 1``, per-branch weights 1 and the final logits under the same loss. Departures:

    - Branch heads (``kdkit.distillers.ofa_branches``): ``branch="official"`` (default) builds
      the authors' projectors with their initialisation: for CNN stages, depthwise-separable
      conv blocks that downsample to the last tapped stage's resolution, widening to
      ``branch_width`` (default: the widest tapped stage; the authors: the larger of the two
      networks' final widths); for ViT stages, patch merging towards a 7 x 7 grid and
      ``max(n - 1 - i, 1)`` transformer blocks for stage ``i`` of ``n``, then the CLS token (the
      first prefix token; the authors' code leaves several prefix tokens as a to-do) or the mean.
      ``branch="simple"`` is a one-layer head (``MapBranch``: 1x1 conv + BN + ReLU, pooling,
      linear; ``TokenBranch``: LayerNorm, patch-token mean or CLS token, linear, PyTorch's
      initialisation), much cheaper for ViT students.
    - ``variant="paper"`` (default) is the paper's equation, whose target weight includes the
      label's own cross-entropy; the task's cross-entropy then counts it a second time on the
      final logits. ``variant="official"`` is the authors' code, which leaves it to the task loss
      (their ``gt_loss_weight = 1``) and raises the non-target probabilities to ``gamma`` too.
    - The number of classes is the teacher logits' width.

    Args:
        weight: multiplier of every term (the authors: ``ofa_loss_weight = kd_loss_weight = 1``).
        stages: student modules whose outputs get a branch: CNN maps ``[B, C, H, W]`` or ViT
            tokens ``[B, P + N, D]`` (e.g. ``[layer1, layer2, layer3]``, ``[blocks.0, blocks.1]``).
        student_prefix_tokens: ``P`` of token stages (1: CLS, 2: CLS + distillation token, 0:
            none); required for tokens, ignored for maps.
        gamma: modulating exponent, one number or one per stage plus one for the final logits
            (the authors' ``ofa_eps`` list, the last entry for the logits).
        temperature: softmax temperature ``T`` of both sides (no ``T^2`` factor).
        final: also apply the loss to the student's own logits (the authors' ``loss_kd``).
        stage_weight: weight of each stage's term, one number or one per stage.
        final_weight: weight of the ``final`` term.
        variant: ``"paper"`` or ``"official"`` (see ``ofa_loss``).
        branch: ``"official"`` or ``"simple"`` branch heads (see above).
        branch_width: output channels of map branches; None: the widest tapped stage's
            (``official``) or each stage's own (``simple``).
        token_pool: how ``simple`` token branches pool: ``"mean"`` of the patch tokens or ``"cls"``.
    """

    reads_labels = True  # the target class of each row
    handles_soft_labels = True  # their argmax, as the authors do

    def __init__(self, weight: float = 1.0, stages: Sequence[str] = ("layer1", "layer2", "layer3"),
                 student_prefix_tokens: int | None = None, gamma=1.0, temperature: float = 1.0,
                 final: bool = True, stage_weight=1.0, final_weight: float = 1.0, variant: str = "paper",
                 branch_width: int | None = None, token_pool: str = "mean", branch: str = "official"):
        super().__init__(weight)
        if isinstance(stages, str) or not stages:
            raise KdkitError(f"ofa.stages must be a non-empty list of student module names, got {stages!r}")
        self.stages = [str(s) for s in stages]
        self.student_prefix_tokens = student_prefix_tokens
        self.gammas = _per_term(gamma, len(self.stages) + 1, "gamma", "one per stage, then the final logits'")
        if any(g < 0 for g in self.gammas):
            raise KdkitError(f"ofa.gamma must be >= 0, got {self.gammas}")
        if temperature <= 0:
            raise KdkitError(f"ofa.temperature must be > 0, got {temperature}")
        if variant not in VARIANTS:
            raise KdkitError(f"ofa.variant must be one of {VARIANTS}, got {variant!r}")
        if branch not in BRANCHES:
            raise KdkitError(f"ofa.branch must be one of {BRANCHES}, got {branch!r}")
        if token_pool not in TOKEN_POOLS:
            raise KdkitError(f"ofa.token_pool must be one of {TOKEN_POOLS}, got {token_pool!r}")
        if branch_width is not None and int(branch_width) < 1:
            raise KdkitError(f"ofa.branch_width must be a positive channel count or null, got {branch_width}")
        self.temperature = float(temperature)
        self.final = bool(final)
        self.stage_weights = _per_term(stage_weight, len(self.stages), "stage_weight", "one per stage")
        self.final_weight = float(final_weight)
        self.variant, self.token_pool, self.branch = variant, token_pool, branch
        self.branch_width = None if branch_width is None else int(branch_width)
        self.branches: nn.ModuleList | None = None

    @property
    def student_features(self) -> list[str]:
        return list(self.stages)

    def build(self, student: Outputs, teacher: Outputs, context: DistillContext) -> None:
        num_classes = require(teacher, "logits", "ofa").shape[1]
        feats = {name: feature(student, name, "ofa") for name in self.stages}
        branches = make_branches({n: f.shape for n, f in feats.items()}, num_classes, self.student_prefix_tokens,
                                 self.branch_width, self.token_pool, self.branch)
        branches = [b.to(f.device) for b, f in zip(branches, feats.values())]
        self.branches = nn.ModuleList(branches)

    def _target(self, batch: dict, teacher_logits: Tensor) -> Tensor:
        if "label" not in batch:
            raise KdkitError(f"ofa needs batch['label'] (the ground-truth class) but the batch has only "
                             f"{sorted(batch)}")
        label = batch["label"]
        if label.dim() == 2:  # soft labels (mixup, smoothing): their argmax, as the authors do
            label = label.argmax(dim=1)
        if label.dim() != 1 or label.shape[0] != teacher_logits.shape[0]:
            raise KdkitError(f"ofa: batch['label'] has shape {tuple(batch['label'].shape)}; it needs one class "
                             f"per sample, [{teacher_logits.shape[0]}] (or soft labels "
                             f"[{teacher_logits.shape[0]}, {teacher_logits.shape[1]}])")
        return label

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        if self.branches is None:
            raise RuntimeError("ofa: build() must run (on a probe forward) before forward()")
        t = require(teacher, "logits", "ofa")
        target = self._target(batch, t)
        terms = {}
        for i, (name, branch) in enumerate(zip(self.stages, self.branches)):
            z = branch(feature(student, name, "ofa"))
            terms[f"stage{i}"] = self.stage_weights[i] * ofa_loss(
                z, t, target, self.gammas[i], self.temperature, self.variant)
        if self.final:
            s = require(student, "logits", "ofa")
            check_same_shape(s, t, "ofa logits")
            terms["final"] = self.final_weight * ofa_loss(
                s, t, target, self.gammas[-1], self.temperature, self.variant)
        return terms

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, stages={self.stages}, gamma={self.gammas}, "
                f"temperature={self.temperature}, final={self.final}, variant={self.variant!r}, branch={self.branch!r}, "
                f"student_prefix_tokens={self.student_prefix_tokens}")
