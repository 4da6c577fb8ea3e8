"""The one place where a teacher is frozen."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

_DTYPES = {"bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16, "16": torch.float16,
           "16-mixed": torch.float16, "fp16": torch.float16, "32": None, "fp32": None, None: None}


class FrozenTeacher(nn.Module):
    """A teacher model that cannot train: no gradients, eval mode forever, no autograd graph.

    The task keeps this object *outside* its module tree (see ``DistillationTask``), so the
    teacher is never in a checkpoint, never in DDP's gradient sync or buffer broadcast, and never
    in the optimizer; ``FrozenTeacher`` itself guarantees the rest.

    Args:
        model: the teacher network.
        precision: optional autocast precision for the teacher forward alone ("bf16", "16"),
            independent of the student's precision.
    """

    def __init__(self, model: nn.Module, precision: str | None = None):
        super().__init__()
        if str(precision) not in {str(k) for k in _DTYPES}:
            from kdkit.errors import KdkitError

            raise KdkitError(f"teacher.precision={precision!r}: use one of bf16, 16, 32 or null")
        self.model = model
        self.dtype = _DTYPES[precision if precision is None else str(precision)]
        self.model.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Ignore ``mode``: BatchNorm statistics and dropout of a teacher never change."""
        return super().train(False)

    def autocast(self, device_type: str):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.dtype)

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.model(*args, **kwargs)
