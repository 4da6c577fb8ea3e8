"""Small trainable heads that map student representations into the space a loss compares in.

They live on the distiller that needs them (created in ``Distiller.build`` from the probe
shapes), so they train, checkpoint and resume with the student and are dropped on export.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.errors import KdkitError


class ConvAdapter(nn.Module):
    """1x1 convolution + BatchNorm from a student map ``[B, Cs, Hs, Ws]`` to ``[B, Ct, Ht, Wt]``.

    The regressor of FitNets (Romero et al., ICLR 2015), in the form of RepDistiller's
    ``ConvReg`` (conv + BN) but with a 1x1 kernel, so that it only mixes channels. No ReLU
    follows: a tapped teacher map need not be non-negative (e.g. a pre-activation).

    When the spatial sizes differ, the student map is resized to the teacher's ``Ht x Wt``
    *before* the convolution: adaptive average pooling when it is at least as large in both
    dimensions (each output cell is the exact mean of the cells it covers), bilinear
    interpolation otherwise. Both resamplings take per-channel convex combinations, which
    commute with a 1x1 convolution (bias included), so resizing first gives the same result as
    resizing after, at lower cost when the student map is larger.

    Args:
        in_channels: student channels ``Cs``.
        out_channels: teacher channels ``Ct``.
        size: the teacher's spatial size ``(Ht, Wt)``; ``forward`` may override it.
    """

    def __init__(self, in_channels: int, out_channels: int, size: Sequence[int]):
        super().__init__()
        self.size = tuple(int(s) for s in size)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor, size: Sequence[int] | None = None) -> Tensor:
        size = tuple(size) if size is not None else self.size
        if tuple(x.shape[-2:]) != size:
            if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
                x = F.adaptive_avg_pool2d(x, size)
            else:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.bn(self.conv(x))

    def extra_repr(self) -> str:
        return f"size={self.size}"


class LinearAdapter(nn.Module):
    """A linear map on the last dimension: ``[B, Ds] -> [B, Dt]`` or tokens ``[B, N, Ds] -> [B, N, Dt]``.

    Args:
        in_features: student width ``Ds``.
        out_features: teacher width ``Dt``.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor, size: Sequence[int] | None = None) -> Tensor:
        return self.linear(x)


class NormalizedLinear(nn.Module):
    """Linear projection followed by L2 normalisation: the embed head of CRD (Tian et al. 2020).

    The output is float32 whatever the input precision, since contrastive scores divide by a
    small temperature.

    Args:
        in_features: input width.
        out_features: embedding width.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)).float(), dim=1)


def make_adapter(student_shape: Sequence[int], teacher_shape: Sequence[int], who: str) -> nn.Module:
    """The adapter mapping a student tensor of ``student_shape`` to ``teacher_shape`` (batch first)."""
    s, t = tuple(student_shape), tuple(teacher_shape)
    if len(s) == 4 and len(t) == 4:
        return ConvAdapter(s[1], t[1], t[2:])
    if len(s) == len(t) and len(s) in (2, 3) and s[1:-1] == t[1:-1]:
        return LinearAdapter(s[-1], t[-1])
    raise KdkitError(
        f"{who}: no adapter maps student shape {s[1:]} to teacher shape {t[1:]} "
        "(supported: 4-D maps [B, C, H, W], or [B, D] / [B, N, D] with the same N)"
    )
