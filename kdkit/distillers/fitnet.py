"""FitNets: regress an intermediate teacher feature ("hint") from a student feature ("guided")."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.distillers.adapters import make_adapter
from kdkit.distillers.base import DistillContext, FeaturePair, check_same_shape
from kdkit.outputs import Outputs

_LAYOUTS = {2: "a vector", 3: "tokens", 4: "a map"}


def _no_adapter_hint(s: Tensor, t: Tensor) -> str:
    if s.dim() != t.dim() and {s.dim(), t.dim()} <= {3, 4}:
        return (f" (student {_LAYOUTS[s.dim()]}, teacher {_LAYOUTS[t.dim()]}: set adapter: true "
                "for a token <-> map adapter through the patch grid, with the token side's prefix_tokens)")
    return " (set adapter: true to learn a projection)"


class FitNet(FeaturePair):
    """FitNets: Hints for Thin Deep Nets (Romero et al., ICLR 2015).

        L_HT = mean( (r(u_g(x)) - u_h(x))^2 )

    where ``u_h`` is the teacher's hint layer, ``u_g`` the student's guided layer and ``r`` a
    trainable regressor (``adapter``): 1x1 conv + BatchNorm for maps, resizing the student map
    to the teacher's spatial size (see ``ConvAdapter``), a linear layer for vectors/tokens.
    Across architectures (a ViT student and a CNN teacher, or the reverse), the token sequence's
    patch tokens are laid out as their grid and regressed onto the map, or the map onto the
    patch tokens (``kdkit.distillers.adapters``); token sides say how many prefix (CLS /
    distillation) tokens they carry. The paper trains the hint stage first; like RepDistiller,
    kdkit adds it to the task loss in one stage. Returns the single term ``"loss"``.

    Args:
        weight: multiplier of the loss (RepDistiller on CIFAR-100: 100).
        student_feature: student module whose output is the guided feature (e.g. "layer2").
        teacher_feature: teacher module whose output is the hint (e.g. "layer2").
        adapter: learn the regressor ``r``; false compares the features as they are, which
            requires equal shapes.
        student_prefix_tokens, teacher_prefix_tokens: prefix tokens ahead of the patch tokens
            of a token feature ``[B, P + N, D]`` (1: CLS, 2: CLS + distillation token, 0:
            none); needed when a token side meets a map or tokens of another count.
    """

    who = "fitnet"  # the config name in messages (subclasses: their own)

    def __init__(self, weight: float = 100.0, student_feature: str = "layer2",
                 teacher_feature: str = "layer2", adapter: bool = True,
                 student_prefix_tokens: int | None = None, teacher_prefix_tokens: int | None = None):
        super().__init__(weight)
        self.student_feature = str(student_feature)
        self.teacher_feature = str(teacher_feature)
        self.use_adapter = bool(adapter)
        self.prefix_tokens = (student_prefix_tokens, teacher_prefix_tokens)
        self.adapter: nn.Module | None = None

    def build(self, student: Outputs, teacher: Outputs, context: DistillContext) -> None:
        s, t = self.feature_pair(student, teacher, self.who)
        if self.use_adapter:
            self.adapter = make_adapter(s.shape, t.shape, self.who, *self.prefix_tokens,
                                        names=(self.student_feature, self.teacher_feature)).to(s.device)
        else:
            check_same_shape(s, t, self.who, _no_adapter_hint(s, t))

    def aligned(self, student: Outputs, teacher: Outputs) -> tuple[Tensor, Tensor]:
        """``(r(u_g), u_h)``: the student feature through the adapter and the teacher feature in
        the layout they are compared in (equal shapes)."""
        s, t = self.feature_pair(student, teacher, self.who)
        if self.use_adapter:
            if self.adapter is None:
                raise RuntimeError(f"{self.who}: build() must run (on a probe forward) before forward()")
            s, t = self.adapter(s, t.shape[2:] if t.dim() == 4 else None), self.adapter.target(t)
        check_same_shape(s, t, self.who, _no_adapter_hint(s, t))
        return s, t

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        s, t = self.aligned(student, teacher)
        return {"loss": F.mse_loss(s.float(), t.float())}

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, student_feature={self.student_feature!r}, "
                f"teacher_feature={self.teacher_feature!r}, adapter={self.use_adapter}, "
                f"prefix_tokens={self.prefix_tokens}")
