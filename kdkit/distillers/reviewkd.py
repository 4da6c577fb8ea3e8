"""Knowledge review: the student's stages, fused top-down, regress the teacher's stages."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.distillers.base import DistillContext, Distiller, feature, require
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

EMBEDDING = "embedding"  # stage name of the pooled embedding (Outputs.embedding as [B, D, 1, 1])


def hcl_loss(f_s: Tensor, f_t: Tensor, levels: Sequence[int] = (4, 2, 1)) -> Tensor:
    """Hierarchical context loss of one stage: MSE at full resolution (weight 1) and after
    average pooling to ``l x l`` for each level ``l`` smaller than the map (weights 1/2, 1/4,
    ...), divided by the sum of the weights used."""
    total, weights, w = F.mse_loss(f_s, f_t), 1.0, 1.0
    for level in levels:
        if level >= f_s.shape[-2]:
            continue
        w /= 2.0
        total = total + w * F.mse_loss(F.adaptive_avg_pool2d(f_s, level), F.adaptive_avg_pool2d(f_t, level))
        weights += w
    return total / weights


class ABF(nn.Module):
    """Attention-based fusion of one stage (ReviewKD's ABF).

    ``x`` (student stage, ``C_s`` channels) -> 1x1 conv + BN to ``mid`` channels; when ``fuse``,
    the running residual ``y`` from the deeper stage is resized (nearest) to ``x``'s size and
    mixed with it by two sigmoid attention maps from a 1x1 conv on ``[x, y]``:
    ``x * a_0 + y * a_1``. The result, resized (nearest) to the teacher stage's size, is both the
    residual passed to the next shallower stage and, after a 3x3 conv + BN to ``C_t``
    channels, this stage's output.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False),
                                   nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = (nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid())
                         if fuse else None)
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size: Sequence[int]) -> tuple[Tensor, Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            attention = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * attention[:, :1] + residual * attention[:, 1:]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


class ReviewKD(Distiller):
    """Distilling Knowledge via Knowledge Review (Chen, Liu, Zhao & Jia, CVPR 2021).

    Stage ``i`` of the student (shallow to deep, ``i = 1..n``) is fused with all deeper student
    stages by attention-based fusion, top-down, and the result regresses the teacher's stage
    ``i``:

        Z_n = ABF_n(F_s^n),   Z_i = ABF_i(F_s^i, Z_{i+1})  (i < n)
        L_RKD = w(step) * sum_i HCL(Z_i, F_t^i)
        HCL(A, B) = [ MSE(A, B) + sum_k 2^-k MSE(P_{l_k}(A), P_{l_k}(B)) ] / (1 + sum_k 2^-k)

    with ``P_l`` adaptive average pooling to ``l x l`` over the pyramid levels ``l`` (4, 2, 1)
    smaller than the map. As in the official code and mdistiller, the student stages are
    post-ReLU outputs, the teacher stages pre-ReLU ones, the last stage of each is the pooled
    embedding (stage name ``embedding``, a ``[B, D, 1, 1]`` map), and the ABF width is
    ``min(512, C_s of the deepest stage)``. ``w = min(step / warmup_steps, 1)`` counts forward
    calls in training mode (mdistiller ramps over 20 epochs) and is kept in a persistent
    buffer. Returns the single term ``"loss"``.

    Differences from the paper: none in the loss; the ABF output is resized to the teacher
    stage's size, so student and teacher stages may differ in resolution.

    Args:
        weight: multiplier of the loss (mdistiller default 1.0; its CIFAR-100 config for
            resnet32x4 -> resnet8x4: 5.0).
        student_stages: student module names (or ``embedding``), shallow to deep.
        teacher_stages: teacher module names (or ``embedding``), same length and order.
        hcl_levels: pyramid pooling sizes of the HCL.
        warmup_steps: training steps of the linear warm-up of the loss (0: none).
        mid_channels: ABF width; None: ``min(512, channels of the deepest student stage)``.
    """

    def __init__(self, weight: float = 1.0,
                 student_stages: Sequence[str] = ("layer1", "layer2", "layer3", EMBEDDING),
                 teacher_stages: Sequence[str] = ("layer1.2.relu2:input", "layer2.2.relu2:input",
                                                  "layer3.2.relu2:input", EMBEDDING),
                 hcl_levels: Sequence[int] = (4, 2, 1), warmup_steps: int = 0,
                 mid_channels: int | None = None):
        super().__init__(weight)
        self.student_stages = [str(s) for s in student_stages]
        self.teacher_stages = [str(t) for t in teacher_stages]
        if not self.student_stages or len(self.student_stages) != len(self.teacher_stages):
            raise KdkitError(
                f"reviewkd: student_stages and teacher_stages must be non-empty lists of the "
                f"same length, got {len(self.student_stages)} and {len(self.teacher_stages)}"
            )
        if warmup_steps < 0 or any(int(level) < 1 for level in hcl_levels) or (
                mid_channels is not None and mid_channels < 1):
            raise KdkitError(f"reviewkd: need warmup_steps >= 0, hcl_levels >= 1 and mid_channels "
                             f">= 1 (or null); got warmup_steps={warmup_steps}, "
                             f"hcl_levels={list(hcl_levels)}, mid_channels={mid_channels}")
        self.hcl_levels = [int(level) for level in hcl_levels]
        self.warmup_steps = int(warmup_steps)
        self.mid_channels = None if mid_channels is None else int(mid_channels)
        self.abfs = nn.ModuleList()
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @property
    def student_features(self) -> list[str]:
        return [s for s in self.student_stages if s != EMBEDDING]

    @property
    def teacher_features(self) -> list[str]:
        return [t for t in self.teacher_stages if t != EMBEDDING]

    @staticmethod
    def _stages(outputs: Outputs, names: list[str], role: str) -> list[Tensor]:
        maps = []
        for name in names:
            f = require(outputs, "embedding", "reviewkd") if name == EMBEDDING else feature(outputs, name, "reviewkd")
            if f.dim() == 2:
                f = f[:, :, None, None]
            if f.dim() != 4:
                raise KdkitError(f"reviewkd: {role} stage {name!r} must be [B, C, H, W] or "
                                 f"[B, D], got shape {tuple(f.shape[1:])}")
            maps.append(f)
        return maps

    def build(self, student: Outputs, teacher: Outputs, context: DistillContext) -> None:
        s_maps = self._stages(student, self.student_stages, "student")
        t_maps = self._stages(teacher, self.teacher_stages, "teacher")
        mid = self.mid_channels or min(512, s_maps[-1].shape[1])
        n = len(s_maps)
        self.abfs = nn.ModuleList(
            ABF(s.shape[1], mid, t.shape[1], fuse=i < n - 1) for i, (s, t) in enumerate(zip(s_maps, t_maps))
        ).to(s_maps[0].device)

    def warmup_factor(self) -> Tensor | float:
        return 1.0 if self.warmup_steps == 0 else torch.clamp(self.step.float() / self.warmup_steps, max=1.0)

    def fused(self, student: Outputs, sizes: list[Sequence[int]]) -> list[Tensor]:
        """The ABF outputs ``Z_1..Z_n`` (shallow to deep), ``Z_i`` at ``sizes[i]``."""
        s_maps = self._stages(student, self.student_stages, "student")
        outs, residual = [None] * len(s_maps), None
        for i in reversed(range(len(s_maps))):
            outs[i], residual = self.abfs[i](s_maps[i], residual, sizes[i])
        return outs

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        if len(self.abfs) != len(self.student_stages):
            raise RuntimeError("reviewkd: build() must run (on a probe forward) before forward()")
        t_maps = self._stages(teacher, self.teacher_stages, "teacher")
        outs = self.fused(student, [t.shape[-2:] for t in t_maps])
        if self.training:
            self.step += 1
        total = sum(hcl_loss(z.float(), t.float(), self.hcl_levels) for z, t in zip(outs, t_maps))
        return {"loss": self.warmup_factor() * total}

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, student_stages={self.student_stages}, "
                f"teacher_stages={self.teacher_stages}, hcl_levels={self.hcl_levels}, "
                f"warmup_steps={self.warmup_steps}, mid_channels={self.mid_channels}")
