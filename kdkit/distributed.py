"""Cross-rank helpers for contrastive and listwise distillers.

``gather`` concatenates a tensor from every rank and keeps autograd intact: the backward pass
sums, over all ranks, the gradient each rank's loss sends to a slice, and returns to every rank
the gradient of *its own* (local) slice. A loss computed for the local rows against the gathered
columns therefore gives, after DDP's gradient averaging, exactly the gradient of the same loss on
one process with the whole global batch (tests/test_distributed.py checks 2 x B == 1 x 2B).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rank, size = world()
        ctx.rank, ctx.size, ctx.n = rank, size, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss may use every slice
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather(x: Tensor) -> tuple[Tensor, int]:
    """All ranks' ``x`` concatenated along dim 0, and the offset of the local rows in it.

    Every rank must pass the same shape (use ``drop_last=True`` for training loaders).
    """
    rank, size = world()
    if size == 1:
        return x, 0
    return _GatherWithGrad.apply(x), rank * x.shape[0]


@torch.no_grad()
def gather_nograd(x: Tensor) -> Tensor:
    """All ranks' ``x`` concatenated along dim 0, without autograd (memory-bank updates)."""
    _, size = world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)
