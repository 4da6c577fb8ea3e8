"""Shared by the distillers that compare ``pairs`` of student and teacher feature maps
(AT, NST, AB, FT, FSP, VID, OFD, MSDCRD): the taps the pairs name, the pairs' maps checked to be
``[B, C, H, W]``, and maps brought to one spatial size."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdkit.distillers.base import Distiller, feature
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs


class MapPairs(Distiller):
    """Base of the distillers that compare ``pairs`` of ``[student_module, teacher_module]``
    outputs: it taps the modules the pairs name (subclasses set ``self.pairs``)."""

    pairs: list[tuple[str, str]] = []

    @property
    def student_features(self) -> list[str]:
        return [pair[0] for pair in self.pairs]

    @property
    def teacher_features(self) -> list[str]:
        return [pair[1] for pair in self.pairs]


def paired_maps(student: Outputs, teacher: Outputs, pairs, who: str):
    """Yields ``(student map, teacher map)`` for every ``[student_module, teacher_module]`` of
    ``pairs``; a clear error when either is not a map ``[B, C, H, W]``."""
    for s_name, t_name in pairs:
        maps = feature(student, s_name, who), feature(teacher, t_name, who)
        if any(m.dim() != 4 for m in maps):
            got = " and ".join(f"{role} {tuple(m.shape[1:])}" for role, m in zip(("student", "teacher"), maps))
            raise KdkitError(f"{who}: pair [{s_name}, {t_name}] needs maps [B, C, H, W], got {got}")
        yield maps


def pool_to_smaller(*maps: Tensor) -> tuple[Tensor, ...]:
    """The maps ``[B, C, H, W]``, each average-pooled to the smallest height and width among them."""
    size = tuple(min(m.shape[d] for m in maps) for d in (-2, -1))
    return tuple(m if tuple(m.shape[-2:]) == size else F.adaptive_avg_pool2d(m, size) for m in maps)
