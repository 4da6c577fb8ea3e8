"""Token grids and feature maps: the two layouts an intermediate vision feature comes in.

A convolutional network's stage gives a map ``[B, C, H, W]``; a vision transformer's block gives
a token sequence ``[B, P + N, D]``: ``P`` prefix tokens (CLS, DeiT's distillation token, register
tokens) followed by ``N = h * w`` patch tokens in row-major order. How many prefix tokens a
sequence carries is not visible in its shape, so kdkit never guesses it: a distiller that must
lay tokens out as a grid asks for ``<role>_prefix_tokens`` in its config and stops with both
shapes and the values that would fit when it is missing or wrong.
"""

from __future__ import annotations

import math

from torch import Tensor

from kdkit.errors import KdkitError


def square_grid(num_tokens: int) -> tuple[int, int] | None:
    """``(h, w)`` with ``h = w`` and ``h * w = num_tokens``, or None when it is not a square."""
    side = math.isqrt(num_tokens)
    return (side, side) if num_tokens > 0 and side * side == num_tokens else None


def fitting_prefixes(num_tokens: int, most: int = 8) -> list[int]:
    """The prefix-token counts ``P <= most`` that leave a square number of patch tokens."""
    return [p for p in range(min(most, num_tokens - 1) + 1) if square_grid(num_tokens - p)]


def check_prefix(shape, prefix_tokens: int | None, who: str, role: str, name: str) -> tuple[int, int]:
    """The patch grid ``(h, w)`` of a token sequence of ``shape`` ``[B, P + N, D]``.

    Raises a ``KdkitError`` that shows the shape and the prefix counts that would fit when
    ``prefix_tokens`` is None (not said) or leaves a non-square number of patch tokens.
    """
    shape = tuple(shape)
    if len(shape) != 3:
        raise KdkitError(f"{who}: {role} feature {name!r} has shape {shape[1:]}, not tokens [N, D]")
    total = shape[1]
    fits = fitting_prefixes(total)
    hint = (f"prefix counts that leave a square grid: {fits} (1: a CLS token, 2: CLS + distillation "
            "token, 0: no prefix)" if fits else "no prefix count leaves a square grid")
    if prefix_tokens is None:
        raise KdkitError(
            f"{who}: {role} feature {name!r} is a token sequence {shape[1:]}: say how many prefix "
            f"(CLS / distillation) tokens precede the patch tokens with {who}.{role}_prefix_tokens; {hint}")
    prefix = int(prefix_tokens)
    grid = square_grid(total - prefix) if 0 <= prefix < total else None
    if grid is None:
        raise KdkitError(
            f"{who}: {role} feature {name!r} {shape[1:]} with {role}_prefix_tokens={prefix} leaves "
            f"{total - prefix} patch tokens, not a square grid; {hint}")
    return grid


def patch_tokens(x: Tensor, prefix_tokens: int) -> Tensor:
    """The patch tokens ``[B, N, D]`` of a sequence ``[B, P + N, D]`` (prefix tokens dropped)."""
    return x[:, int(prefix_tokens):]


def tokens_to_map(x: Tensor, prefix_tokens: int, grid: tuple[int, int]) -> Tensor:
    """Patch tokens laid out as a map: ``[B, P + h*w, D] -> [B, D, h, w]`` (row-major patches)."""
    b, _, d = x.shape
    return patch_tokens(x, prefix_tokens).transpose(1, 2).reshape(b, d, grid[0], grid[1])


def map_to_tokens(x: Tensor) -> Tensor:
    """A map as a token sequence without prefix: ``[B, C, H, W] -> [B, H*W, C]`` (row-major)."""
    return x.flatten(2).transpose(1, 2)


def as_map(x: Tensor, prefix_tokens: int | None, who: str, role: str, name: str) -> Tensor:
    """``x`` as a map ``[B, C, H, W]``: maps pass through; token sequences are reshaped (their
    prefix tokens dropped), which needs ``prefix_tokens``; anything else is an error."""
    if x.dim() == 4:
        return x
    if x.dim() == 3:
        return tokens_to_map(x, prefix_tokens, check_prefix(x.shape, prefix_tokens, who, role, name))
    raise KdkitError(f"{who}: {role} feature {name!r} has shape {tuple(x.shape[1:])}: "
                     "neither a map [C, H, W] nor tokens [N, D]")
