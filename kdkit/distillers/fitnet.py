"""FitNets: regress an intermediate teacher feature ("hint") from a student feature ("guided")."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.distillers.adapters import make_adapter
from kdkit.distillers.base import DistillContext, Distiller, check_same_shape, feature
from kdkit.outputs import Outputs

_NO_ADAPTER_HINT = " (set adapter: true to learn a projection)"


class FitNet(Distiller):
    """FitNets: Hints for Thin Deep Nets (Romero et al., ICLR 2015).

        L_HT = mean( (r(u_g(x)) - u_h(x))^2 )

    where ``u_h`` is the teacher's hint layer, ``u_g`` the student's guided layer and ``r`` a
    trainable regressor (``adapter``): 1x1 conv + BatchNorm for maps, resizing the student map
    to the teacher's spatial size (see ``ConvAdapter``), a linear layer for vectors/tokens. The
    paper trains the hint stage first; like RepDistiller, kdkit adds it to the task loss in one
    stage. Returns the single term ``"loss"``.

    Args:
        weight: multiplier of the loss (RepDistiller on CIFAR-100: 100).
        student_feature: student module whose output is the guided feature (e.g. "layer2").
        teacher_feature: teacher module whose output is the hint (e.g. "layer2").
        adapter: learn the regressor ``r``; false compares the features as they are, which
            requires equal shapes.
    """

    def __init__(self, weight: float = 100.0, student_feature: str = "layer2",
                 teacher_feature: str = "layer2", adapter: bool = True):
        super().__init__(weight)
        self.student_feature = str(student_feature)
        self.teacher_feature = str(teacher_feature)
        self.use_adapter = bool(adapter)
        self.adapter: nn.Module | None = None

    @property
    def student_features(self) -> list[str]:
        return [self.student_feature]

    @property
    def teacher_features(self) -> list[str]:
        return [self.teacher_feature]

    def _pair(self, student: Outputs, teacher: Outputs) -> tuple[Tensor, Tensor]:
        return (feature(student, self.student_feature, "fitnet"),
                feature(teacher, self.teacher_feature, "fitnet"))

    def build(self, student: Outputs, teacher: Outputs, context: DistillContext) -> None:
        s, t = self._pair(student, teacher)
        if self.use_adapter:
            self.adapter = make_adapter(s.shape, t.shape, "fitnet").to(s.device)
        else:
            check_same_shape(s, t, "fitnet", _NO_ADAPTER_HINT)

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        s, t = self._pair(student, teacher)
        if self.use_adapter:
            if self.adapter is None:
                raise RuntimeError("fitnet: build() must run (on a probe forward) before forward()")
            s = self.adapter(s, t.shape[2:] if t.dim() == 4 else None)
        check_same_shape(s, t, "fitnet", _NO_ADAPTER_HINT)
        return {"loss": F.mse_loss(s.float(), t.float())}

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, student_feature={self.student_feature!r}, "
                f"teacher_feature={self.teacher_feature!r}, adapter={self.use_adapter}")
