"""OFA-KD's branch heads: a student stage (CNN map or ViT tokens) to class logits.

``official`` follows the authors' projectors (Hao et al., NeurIPS 2023; their ``distillers/ofa.py``):
depthwise-separable conv blocks that downsample a CNN stage to the last stage's resolution, or
patch merging and transformer blocks for a ViT stage. ``simple`` is a one-layer head, cheaper
on CPU. ``make_branch`` builds either from the stage shapes a probe forward gave.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from kdkit.distillers.token_layout import check_prefix, patch_tokens
from kdkit.errors import KdkitError
from kdkit.models.init import he_init

BRANCHES = ("official", "simple")
TOKEN_POOLS = ("mean", "cls")
FINAL_GRID = 7  # the authors merge ViT patch grids down to 7 x 7 (ImageNet's last-stage grid)
HEADS = 4  # attention heads of the authors' branch blocks


class MapBranch(nn.Module):
    """``simple`` CNN branch: a stage ``[B, C, H, W]`` to class logits ``[B, K]``: 1x1 conv
    (``C -> width``, no bias) + BatchNorm + ReLU, global average pooling, linear (``width -> K``).

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
    """``simple`` ViT branch: tokens ``[B, P + N, D]`` to class logits ``[B, K]``: LayerNorm, then
    the mean of the ``N`` patch tokens (``pool="mean"``, the ``P`` prefix tokens dropped) or the
    first prefix token (``pool="cls"``), then linear (``D -> K``).

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


class SepConv(nn.Sequential):
    """Depthwise-separable conv block that halves the resolution (DARTS's ``SepConv``, which the
    OFA authors use): [3x3 depthwise stride 2, 1x1, BN, ReLU, 3x3 depthwise, 1x1 to ``out``, BN, ReLU]."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, in_channels, 1, bias=False), nn.BatchNorm2d(in_channels), nn.ReLU(),
            nn.Conv2d(in_channels, in_channels, 3, stride=1, padding=1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU())


class OfficialMapBranch(nn.Module):
    """``official`` CNN branch (the authors' projector for CNN students): ``body`` is
    ``downsamples`` ``SepConv`` blocks, each doubling the channels and the last one going to
    ``out_channels``, or a 1x1 conv to ``out_channels`` for a stage already at the last
    resolution; then global average pooling and linear (``fc``) to ``K``. The authors downsample
    stage ``s`` of 4 by ``4 - s`` blocks to the last stage's resolution and widen to the larger of
    the two networks' final widths."""

    def __init__(self, in_channels: int, downsamples: int, out_channels: int, num_classes: int):
        super().__init__()
        if downsamples == 0:
            layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 1)]
        else:
            layers, c = [], in_channels
            for i in range(downsamples):
                nxt = out_channels if i == downsamples - 1 else 2 * c
                layers.append(SepConv(c, nxt))
                c = nxt
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(out_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x).mean(dim=(2, 3)))


class PatchMerging(nn.Module):
    """Swin's patch merging (Liu et al., ICCV 2021), as the OFA authors use it: each 2x2 group of
    patch tokens ``[B, h*w, D]`` is concatenated (``4D``), LayerNorm-ed and projected to ``D``
    (no bias), giving ``[B, h/2 * w/2, D]``; ``act`` (GELU, or none for the last merge) follows."""

    def __init__(self, grid: Sequence[int], dim: int, act: bool = True):
        super().__init__()
        self.grid = tuple(int(v) for v in grid)
        if self.grid[0] % 2 or self.grid[1] % 2:
            raise KdkitError(f"ofa: patch merging needs an even patch grid, got {self.grid}")
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, dim, bias=False)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        b, _, d = x.shape
        h, w = self.grid
        x = x.view(b, h, w, d)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.act(self.reduction(self.norm(x.view(b, -1, 4 * d))))


class OfficialTokenBranch(nn.Module):
    """``official`` ViT branch (the authors' projector for ViT students): the patch tokens are
    merged (``PatchMerging``) ``floor(log2(h / 7))`` times, towards a 7 x 7 grid (none for grids
    under 14), the prefix tokens
    passing unchanged; then ``blocks`` transformer blocks (timm ``Block``, 4 heads) on the whole
    sequence; then the first prefix token (CLS), or the mean of all tokens when there is none;
    then linear to ``K``. No final norm, as in the authors' code.

    Args:
        prefix_tokens: ``P``. grid: the patch grid ``(h, w)``. dim: ``D``. num_classes: ``K``.
        blocks: transformer blocks (the authors: ``max(4 - stage, 1)``).
    """

    def __init__(self, prefix_tokens: int, grid: Sequence[int], dim: int, num_classes: int, blocks: int):
        super().__init__()
        if dim % HEADS:
            raise KdkitError(f"ofa: the official token branch uses {HEADS} attention heads, which need a "
                             f"width divisible by {HEADS}; this stage's is {dim} (use branch: simple)")
        self.prefix_tokens = int(prefix_tokens)
        merges = max(int(math.log2(grid[0] / FINAL_GRID)), 0)
        # GELU after every merge but the last, and always after the first (the authors' code)
        self.merge = nn.Sequential(*[PatchMerging((grid[0] >> i, grid[1] >> i), dim, act=i == 0 or i != merges - 1)
                                     for i in range(merges)])
        self.blocks = nn.Sequential(*[Block(dim, num_heads=HEADS) for _ in range(int(blocks))])
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        p = self.prefix_tokens
        x = self.blocks(torch.cat([x[:, :p], self.merge(x[:, p:])], dim=1))
        return self.fc(x[:, 0] if p else x.mean(dim=1))

    def extra_repr(self) -> str:
        return f"prefix_tokens={self.prefix_tokens}"


def init_official(module: nn.Module) -> nn.Module:
    """The authors' initialisation of their branches: Kaiming-normal (fan-out) convolutions,
    BatchNorm at (1, 0), truncated-normal (std 0.02) linear weights with zero biases."""
    he_init(module)
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def make_branches(shapes: dict[str, Sequence[int]], num_classes: int, prefix_tokens: int | None = None,
                  width: int | None = None, token_pool: str = "mean", kind: str = "official") -> list[nn.Module]:
    """One branch per stage (``shapes``: stage name -> its output shape, batch first, in the
    order of the stages, shallowest first).

    ``simple``: ``MapBranch`` (``width`` None: the stage's channels) or ``TokenBranch``.
    ``official``: map stage ``i`` gets ``log2(H_i / H_last)`` ``SepConv`` blocks, ``H_last`` the
    smallest map height among the stages, widening to ``width`` (None: the widest map stage's
    channels; the authors take the larger of the student's and the teacher's final widths, which
    kdkit does not tap); token stage ``i`` of ``n`` gets ``max(n - 1 - i, 1)`` blocks (the authors'
    ``max(4 - stage, 1)`` when all four stages are branched). Tokens need ``prefix_tokens``."""
    maps = {n: tuple(s) for n, s in shapes.items() if len(s) == 4}
    last_height = min((s[2] for s in maps.values()), default=None)
    widest = max((s[1] for s in maps.values()), default=None)
    branches = []
    for i, (name, shape) in enumerate(shapes.items()):
        shape = tuple(shape)
        if len(shape) == 4:
            if kind == "simple":
                branches.append(MapBranch(shape[1], int(width) if width else shape[1], num_classes))
                continue
            downsamples = max(round(math.log2(shape[2] / last_height)), 0)
            branches.append(init_official(OfficialMapBranch(shape[1], downsamples, int(width or widest), num_classes)))
        elif len(shape) == 3:
            grid = check_prefix(shape, prefix_tokens, "ofa", "student", name)
            if kind == "simple":
                if token_pool == "cls" and int(prefix_tokens) < 1:
                    raise KdkitError(f"ofa: student stage {name!r} {shape[1:]} has student_prefix_tokens=0, so "
                                     "there is no CLS token for token_pool='cls'; use token_pool='mean'")
                branches.append(TokenBranch(prefix_tokens, shape[2], num_classes, token_pool))
                continue
            blocks = max(len(shapes) - 1 - i, 1)
            branches.append(init_official(OfficialTokenBranch(prefix_tokens, grid, shape[2], num_classes, blocks)))
        else:
            raise KdkitError(f"ofa: student stage {name!r} has shape {shape[1:]}: neither a map [C, H, W] nor "
                             "tokens [N, D]; tap a stage's output (e.g. layer2, blocks.1)")
    return branches
