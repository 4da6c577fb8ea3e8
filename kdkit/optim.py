"""Learning-rate schedules that need to know the run length (the task passes it in)."""

from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(optimizer, total_steps: int, warmup_frac: float = 0.0, min_ratio: float = 0.0):
    """Linear warm-up over ``warmup_frac`` of the run, then cosine decay to ``min_ratio`` x lr.

    Stepped every optimizer step, so one config works for any epoch count or dataset size.
    """
    warmup = int(warmup_frac * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def constant(optimizer, total_steps: int):
    return LambdaLR(optimizer, lambda _step: 1.0)
