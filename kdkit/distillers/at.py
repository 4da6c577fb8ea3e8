"""Attention transfer: match where (spatially) the networks' activations concentrate."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from kdkit.distillers.base import Distiller, feature
from kdkit.distillers.token_layout import as_map
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

DEFAULT_PAIRS = (("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3"))


def parse_pairs(pairs, who: str) -> list[tuple[str, str]]:
    """``[[student_name, teacher_name], ...]`` (lists from YAML) as a list of string tuples."""
    out = []
    for pair in pairs:
        if isinstance(pair, str) or len(pair) != 2:
            raise KdkitError(
                f"{who}.pairs: each entry must be [student_module, teacher_module], got {pair!r}"
            )
        out.append((str(pair[0]), str(pair[1])))
    if not out:
        raise KdkitError(f"{who}.pairs is empty: give at least one [student_module, teacher_module]")
    return out


def attention_map(f: Tensor, p: float = 2.0) -> Tensor:
    """``Q = vec(mean_c |F_c|^p) / ||vec(mean_c |F_c|^p)||_2`` for a map ``[B, C, H, W]`` -> ``[B, H*W]``."""
    return F.normalize(f.float().abs().pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(f_s: Tensor, f_t: Tensor, p: float = 2.0) -> Tensor:
    """``mean_{b, j} (Q_s - Q_t)^2``; the larger map is first average-pooled to the smaller size."""
    size = (min(f_s.shape[-2], f_t.shape[-2]), min(f_s.shape[-1], f_t.shape[-1]))
    if tuple(f_s.shape[-2:]) != size:
        f_s = F.adaptive_avg_pool2d(f_s, size)
    if tuple(f_t.shape[-2:]) != size:
        f_t = F.adaptive_avg_pool2d(f_t, size)
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


class AT(Distiller):
    """Attention Transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017).

        Q^j = vec(F^j_att) / ||vec(F^j_att)||_2,   F^j_att = mean_c |A^j_c|^p
        L_AT = sum_j mean_{b, pixels} (Q^j_s - Q^j_t)^2

    over the pairs ``j`` of student/teacher activation maps (channel counts may differ; a
    spatial mismatch is resolved by adaptive average pooling of the larger map). Like the paper
    (beta/2 * sum_j ||.||_2 with beta = 1e3 divided by the map size and the batch size) and
    RepDistiller (``sum(loss_group)``), pairs are *summed* and each pair is averaged over batch
    and positions, so ``weight: 1000`` means what RepDistiller's ``-b 1000`` means. A vision
    transformer's token feature ``[B, P + h*w, D]`` takes part as its patch-token map
    ``[B, D, h, w]`` (its ``P`` prefix tokens dropped), so CNN <-> ViT pairs compare where each
    network's activations concentrate on the image. Returns the single term ``"loss"``.

    Args:
        weight: multiplier of the loss (RepDistiller on CIFAR-100: 1000).
        pairs: ``[[student_module, teacher_module], ...]`` whose outputs are compared.
        p: exponent of the attention map (the paper uses 2).
        student_prefix_tokens, teacher_prefix_tokens: prefix (CLS / distillation) tokens ahead
            of the patch tokens of each side's token features; required for token features.
    """

    def __init__(self, weight: float = 1000.0, pairs: Sequence = DEFAULT_PAIRS, p: float = 2.0,
                 student_prefix_tokens: int | None = None, teacher_prefix_tokens: int | None = None):
        super().__init__(weight)
        self.prefix_tokens = {"student": student_prefix_tokens, "teacher": teacher_prefix_tokens}
        self.pairs = parse_pairs(pairs, "at")
        if p <= 0:
            raise KdkitError(f"at.p must be > 0, got {p}")
        self.p = float(p)

    @property
    def student_features(self) -> list[str]:
        return [s for s, _ in self.pairs]

    @property
    def teacher_features(self) -> list[str]:
        return [t for _, t in self.pairs]

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        total = 0.0
        for s_name, t_name in self.pairs:
            f_s, f_t = feature(student, s_name, "at"), feature(teacher, t_name, "at")
            if f_s.dim() not in (3, 4) or f_t.dim() not in (3, 4):
                raise KdkitError(
                    f"at: pair [{s_name}, {t_name}] must be maps [B, C, H, W] or tokens [B, N, D], "
                    f"got student shape {tuple(f_s.shape[1:])} and teacher shape {tuple(f_t.shape[1:])}"
                )
            f_s = as_map(f_s, self.prefix_tokens["student"], "at", "student", s_name)
            f_t = as_map(f_t, self.prefix_tokens["teacher"], "at", "teacher", t_name)
            total = total + at_loss(f_s, f_t, self.p)
        return {"loss": total}

    def extra_repr(self) -> str:
        return f"weight={self.weight}, pairs={self.pairs}, p={self.p}, prefix_tokens={self.prefix_tokens}"
