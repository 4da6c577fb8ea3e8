"""Each model's own image pipeline: resize to its input size, normalise with its statistics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.errors import KdkitError


class ImageInputs:
    """Mixin for image tasks (before ``DistillationTask`` in the bases): ``image_input(batch,
    role)`` gives model ``role`` ("student" or a teacher's name) the image it expects.

    Batches carry images in [0, 1] at the data's resolution; every model then gets its own
    view: resized (bilinear, antialiased) to its ``size`` when that differs, normalised with its
    ``mean`` / ``std``, and in channels_last layout when the task asks. A teacher trained with
    ImageNet statistics, or a CLIP model that reads 224 x 224 images, is fed what it expects
    while the student keeps the data's own pipeline.

    Args (keyword, taken here; the rest goes on to ``DistillationTask``):
        channels_last: convert the student and every teacher to channels_last memory format,
            and feed them 4-D images in that layout (faster convolutions with bf16, and on CPU).
    """

    def __init__(self, *args, channels_last: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.student.to(memory_format=torch.channels_last)
            for teacher in self.teachers.values():
                teacher.to(memory_format=torch.channels_last)

    def register_image_pipelines(self, specs: Mapping[str, Mapping]) -> None:
        """``specs``: role -> ``{"mean": [...], "std": [...], "size": (H, W) | int | None}``."""
        self.image_sizes = {}
        for role, spec in specs.items():
            self.register_buffer(f"{role}_mean", _channel_stat(spec["mean"]), persistent=False)
            self.register_buffer(f"{role}_std", _channel_stat(spec["std"]), persistent=False)
            self.image_sizes[role] = _size(spec.get("size"), role)

    def image_input(self, batch: dict, role: str) -> Tensor:
        x = batch["image"]
        size = self.image_sizes.get(role)
        if size is not None and tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        x = (x - getattr(self, f"{role}_mean")) / getattr(self, f"{role}_std")
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def _channel_stat(values: Sequence[float]) -> Tensor:
    return torch.tensor(list(values), dtype=torch.float32).view(1, -1, 1, 1)


def _size(value, role: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        value = (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2 or min(value) < 1:
        raise KdkitError(f"image_size of {role}: give one positive int or [H, W], got {value}")
    return value
