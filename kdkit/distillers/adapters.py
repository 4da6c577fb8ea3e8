"""Small trainable heads that map student representations into the space a loss compares in.

They live on the distiller that needs them (created in ``Distiller.build`` from the probe
shapes), so they train, checkpoint and resume with the student and are dropped on export.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.distillers.token_layout import check_prefix, map_to_tokens, patch_tokens, tokens_to_map
from kdkit.errors import KdkitError


def resize_map(x: Tensor, size: Sequence[int]) -> Tensor:
    """``x`` ``[B, C, H, W]`` at spatial ``size``: adaptive average pooling when it is at least as
    large in both dimensions (each output cell is the exact mean of the cells it covers),
    bilinear interpolation otherwise; unchanged when it already has that size."""
    size = tuple(int(v) for v in size)
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


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
        # A map read from tokens (a transposed view) or a channels_last map gives the conv
        # weight a channels_last gradient on CPU once the batch is large (>= 32 here), which
        # DDP's reducer must copy into its buckets ("Grad strides do not match bucket view
        # strides"): a contiguous input keeps the gradient in the weight's own layout.
        return self.bn(self.conv(resize_map(x, self.size if size is None else size).contiguous()))

    def target(self, t: Tensor) -> Tensor:
        """The teacher feature as the adapted student feature is compared with it (as it is)."""
        return t

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

    def target(self, t: Tensor) -> Tensor:
        return t


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


class TokensToMap(nn.Module):
    """A ViT student's tokens ``[B, P + h*w, Ds]`` regressed onto a CNN teacher's map ``[B, Ct, Ht, Wt]``.

    The ``P`` prefix tokens are dropped, the patch tokens laid out as their ``h x w`` grid
    (``[B, Ds, h, w]``), and a ``ConvAdapter`` (resize to ``Ht x Wt``, 1x1 conv, BN) maps them.

    Args:
        prefix_tokens: ``P``. grid: ``(h, w)``. in_dim: ``Ds``. out_channels: ``Ct``.
        size: the teacher's ``(Ht, Wt)``.
    """

    def __init__(self, prefix_tokens: int, grid: Sequence[int], in_dim: int, out_channels: int,
                 size: Sequence[int]):
        super().__init__()
        self.prefix_tokens, self.grid = int(prefix_tokens), tuple(grid)
        self.map = ConvAdapter(in_dim, out_channels, size)

    def forward(self, x: Tensor, size: Sequence[int] | None = None) -> Tensor:
        return self.map(tokens_to_map(x, self.prefix_tokens, self.grid), size)

    def target(self, t: Tensor) -> Tensor:
        return t

    def extra_repr(self) -> str:
        return f"prefix_tokens={self.prefix_tokens}, grid={self.grid}"


class MapToTokens(nn.Module):
    """A CNN student's map ``[B, Cs, Hs, Ws]`` regressed onto a ViT teacher's patch tokens.

    The map is resized to the teacher's patch grid ``h x w``, mapped by a 1x1 conv + BN to the
    teacher's width ``Dt`` and read row-major as ``[B, h*w, Dt]``; the teacher's sequence
    ``[B, P + h*w, Dt]`` is compared without its ``P`` prefix tokens (``target``).

    Args:
        in_channels: ``Cs``. out_dim: ``Dt``. grid: the teacher's ``(h, w)``.
        teacher_prefix_tokens: ``P``.
    """

    def __init__(self, in_channels: int, out_dim: int, grid: Sequence[int], teacher_prefix_tokens: int):
        super().__init__()
        self.teacher_prefix_tokens = int(teacher_prefix_tokens)
        self.map = ConvAdapter(in_channels, out_dim, grid)

    def forward(self, x: Tensor, size: Sequence[int] | None = None) -> Tensor:
        return map_to_tokens(self.map(x))

    def target(self, t: Tensor) -> Tensor:
        return patch_tokens(t, self.teacher_prefix_tokens)

    def extra_repr(self) -> str:
        return f"teacher_prefix_tokens={self.teacher_prefix_tokens}"


class TokenGrid(nn.Module):
    """Student patch tokens onto a teacher's patch tokens of another count or prefix.

    Both prefixes are dropped; a linear map takes the student width ``Ds`` to ``Dt``, and the
    student grid is resampled to the teacher's (``resize_map``: area pooling down, bilinear up).
    Linear maps and these resamplings commute, so the order changes only the cost.

    Args:
        student_prefix_tokens, student_grid: the student's ``P_s`` and ``(h_s, w_s)``.
        teacher_prefix_tokens, teacher_grid: the teacher's ``P_t`` and ``(h_t, w_t)``.
        in_dim: ``Ds``. out_dim: ``Dt``.
    """

    def __init__(self, student_prefix_tokens: int, student_grid: Sequence[int], teacher_prefix_tokens: int,
                 teacher_grid: Sequence[int], in_dim: int, out_dim: int):
        super().__init__()
        self.student_prefix_tokens, self.student_grid = int(student_prefix_tokens), tuple(student_grid)
        self.teacher_prefix_tokens, self.teacher_grid = int(teacher_prefix_tokens), tuple(teacher_grid)
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor, size: Sequence[int] | None = None) -> Tensor:
        x = self.linear(patch_tokens(x, self.student_prefix_tokens))
        if self.student_grid == self.teacher_grid:
            return x
        grid = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *self.student_grid)
        return map_to_tokens(resize_map(grid, self.teacher_grid))

    def target(self, t: Tensor) -> Tensor:
        return patch_tokens(t, self.teacher_prefix_tokens)

    def extra_repr(self) -> str:
        return (f"student: {self.student_prefix_tokens} prefix + {self.student_grid} grid, "
                f"teacher: {self.teacher_prefix_tokens} prefix + {self.teacher_grid} grid")


def make_adapter(student_shape: Sequence[int], teacher_shape: Sequence[int], who: str,
                 student_prefix_tokens: int | None = None, teacher_prefix_tokens: int | None = None,
                 names: tuple[str, str] = ("", "")) -> nn.Module:
    """The adapter mapping a student tensor of ``student_shape`` to ``teacher_shape`` (batch first).

    Every adapter has ``forward(student, size=None)`` (the student feature in the compared
    layout) and ``target(teacher)`` (the teacher feature in that layout). Maps go to maps
    (``ConvAdapter``), vectors and equal-length token sequences to the teacher's width
    (``LinearAdapter``); token sequences of other lengths or prefixes, and tokens <-> maps, go
    through the patch grid, which needs the ``*_prefix_tokens`` of each token side
    (``TokenGrid``, ``TokensToMap``, ``MapToTokens``). ``names``: the tapped modules, for errors.
    """
    s, t = tuple(student_shape), tuple(teacher_shape)
    s_name, t_name = names

    def grid(shape, prefix_tokens, role: str, name: str) -> tuple[int, int]:
        try:
            return check_prefix(shape, prefix_tokens, who, role, name)
        except KdkitError as err:  # say what it was to be compared with
            raise KdkitError(f"{err} (student shape {s[1:]}, teacher shape {t[1:]})") from None

    if len(s) == 4 and len(t) == 4:
        return ConvAdapter(s[1], t[1], t[2:])
    same_prefix = student_prefix_tokens is None or teacher_prefix_tokens is None or \
        int(student_prefix_tokens) == int(teacher_prefix_tokens)
    if len(s) == len(t) == 2 or (len(s) == len(t) == 3 and s[1] == t[1] and same_prefix):
        return LinearAdapter(s[-1], t[-1])
    if len(s) == 3 and len(t) == 3:
        s_grid = grid(s, student_prefix_tokens, "student", s_name)
        t_grid = grid(t, teacher_prefix_tokens, "teacher", t_name)
        return TokenGrid(student_prefix_tokens, s_grid, teacher_prefix_tokens, t_grid, s[2], t[2])
    if len(s) == 3 and len(t) == 4:
        return TokensToMap(student_prefix_tokens, grid(s, student_prefix_tokens, "student", s_name),
                           s[2], t[1], t[2:])
    if len(s) == 4 and len(t) == 3:
        return MapToTokens(s[1], t[2], grid(t, teacher_prefix_tokens, "teacher", t_name), teacher_prefix_tokens)
    raise KdkitError(
        f"{who}: no adapter maps student shape {s[1:]} to teacher shape {t[1:]} "
        "(supported: maps [C, H, W], tokens [N, D] and vectors [D], each to its own kind, "
        "and tokens <-> maps through the patch grid)"
    )
