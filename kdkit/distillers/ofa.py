"""OFA-KD: intermediate student stages projected into the logit space by small branch heads, each
trained on the teacher's logits with an adaptively target-enhanced KD loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.distillers.base import DistillContext, Distiller, check_same_shape, feature, require
from kdkit.distillers.token_layout import check_prefix, patch_tokens
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

VARIANTS = ("paper", "official")
TOKEN_POOLS = ("mean", "cls")


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


class MapBranch(nn.Module):
    """A CNN stage ``[B, C, H, W]`` to class logits ``[B, K]``: 1x1 conv (``C -> width``, no bias)
    + BatchNorm + ReLU, global average pooling, linear (``width -> K``).

    Args:
        in_channels: ``C``. width: hidden channels. num_classes: ``K``.
    """

    def __init__(self, in_channels: int, width: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


class TokenBranch(nn.Module):
    """A ViT stage's tokens ``[B, P + N, D]`` to class logits ``[B, K]``: LayerNorm, then the mean
    of the ``N`` patch tokens (``pool="mean"``, the ``P`` prefix tokens dropped) or the first
    prefix token (``pool="cls"``), then linear (``D -> K``).

    Args:
        prefix_tokens: ``P``. dim: ``D``. num_classes: ``K``. pool: ``"mean"`` or ``"cls"``.
    """

    def __init__(self, prefix_tokens: int, dim: int, num_classes: int, pool: str = "mean"):
        super().__init__()
        self.prefix_tokens, self.pool = int(prefix_tokens), pool
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        pooled = x[:, 0] if self.pool == "cls" else patch_tokens(x, self.prefix_tokens).mean(dim=1)
        return self.fc(pooled)

    def extra_repr(self) -> str:
        return f"prefix_tokens={self.prefix_tokens}, pool={self.pool!r}"


def make_branch(shape: Sequence[int], num_classes: int, name: str, prefix_tokens: int | None = None,
                width: int | None = None, token_pool: str = "mean") -> nn.Module:
    """The branch head for a student stage of ``shape`` (batch first): ``MapBranch`` for a map
    (``width`` None: the stage's channels), ``TokenBranch`` for tokens, which needs
    ``prefix_tokens`` (and at least one for ``token_pool="cls"``). ``name``: the stage, for errors."""
    shape = tuple(shape)
    if len(shape) == 4:
        return MapBranch(shape[1], int(width) if width else shape[1], num_classes)
    if len(shape) == 3:
        check_prefix(shape, prefix_tokens, "ofa", "student", name)
        if token_pool == "cls" and int(prefix_tokens) < 1:
            raise KdkitError(f"ofa: student stage {name!r} {shape[1:]} has student_prefix_tokens=0, so "
                             "there is no CLS token for token_pool='cls'; use token_pool='mean'")
        return TokenBranch(prefix_tokens, shape[2], num_classes, token_pool)
    raise KdkitError(f"ofa: student stage {name!r} has shape {shape[1:]}: neither a map [C, H, W] nor "
                     "tokens [N, D]; tap a stage's output (e.g. layer2, blocks.1)")


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

    - Branch heads are small (``MapBranch``: 1x1 conv + BN + ReLU, pooling, linear;
      ``TokenBranch``: LayerNorm, patch-token mean or CLS token, linear). The authors' branches
      are deeper: for CNN stages, depthwise-separable conv blocks that downsample to the last
      stage's resolution, widening to the larger of the two networks' final widths; for ViT
      stages, patch merging to a 7 x 7 grid and ``max(4 - stage, 1)`` transformer blocks, then
      the CLS token (or the mean). They initialise them with truncated-normal weights; here
      PyTorch's defaults.
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
        branch_width: hidden channels of map branches; None: the stage's own channels.
        token_pool: how token branches pool: ``"mean"`` of the patch tokens or ``"cls"``.
    """

    reads_labels = True  # the target class of each row

    def __init__(self, weight: float = 1.0, stages: Sequence[str] = ("layer1", "layer2", "layer3"),
                 student_prefix_tokens: int | None = None, gamma=1.0, temperature: float = 1.0,
                 final: bool = True, stage_weight=1.0, final_weight: float = 1.0, variant: str = "paper",
                 branch_width: int | None = None, token_pool: str = "mean"):
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
        if token_pool not in TOKEN_POOLS:
            raise KdkitError(f"ofa.token_pool must be one of {TOKEN_POOLS}, got {token_pool!r}")
        if branch_width is not None and int(branch_width) < 1:
            raise KdkitError(f"ofa.branch_width must be a positive channel count or null, got {branch_width}")
        self.temperature = float(temperature)
        self.final = bool(final)
        self.stage_weights = _per_term(stage_weight, len(self.stages), "stage_weight", "one per stage")
        self.final_weight = float(final_weight)
        self.variant, self.token_pool = variant, token_pool
        self.branch_width = None if branch_width is None else int(branch_width)
        self.branches: nn.ModuleList | None = None

    @property
    def student_features(self) -> list[str]:
        return list(self.stages)

    def build(self, student: Outputs, teacher: Outputs, context: DistillContext) -> None:
        num_classes = require(teacher, "logits", "ofa").shape[1]
        branches = []
        for name in self.stages:
            f = feature(student, name, "ofa")
            branches.append(make_branch(f.shape, num_classes, name, self.student_prefix_tokens,
                                        self.branch_width, self.token_pool).to(f.device))
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
                f"temperature={self.temperature}, final={self.final}, variant={self.variant!r}, "
                f"student_prefix_tokens={self.student_prefix_tokens}")
