"""Pieces the CLIP distillers share: reading a CLIP model's ``Outputs``, embedding projections.

The contrastive losses themselves (global batch, one convention for N processes) live in
``kdkit.losses.contrastive``, next to the image-text task's own loss.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.distillers.base import feature, require
# re-exported for code that imported them from here before they moved to kdkit.losses
from kdkit.losses.contrastive import contrastive_loss, global_targets, similarity_rows  # noqa: F401
from kdkit.outputs import Outputs


def clip_parts(outputs: Outputs, who: str) -> tuple[Tensor, Tensor, Tensor]:
    """(image embedding, text embedding, logit scale) of a CLIP model's ``Outputs``, in float32
    (losses stay float32 under bf16/fp16 autocast)."""
    image = require(outputs, "embedding", who)
    text = feature(outputs, "text_embedding", who)
    scale = feature(outputs, "logit_scale", who)
    return image.float(), text.float(), scale.float()


class EmbeddingProjection(nn.Module):
    """Linear map from a student embedding width to the teacher's (identity when equal).

    CLIP-KD (Yang et al. 2024) projects student embeddings to the teacher's width when they
    differ, then re-normalises; the projection trains with the student.

    Args:
        student_dim: width of the student embedding.
        teacher_dim: width of the teacher embedding.
    """

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.proj = nn.Identity() if student_dim == teacher_dim else nn.Linear(student_dim, teacher_dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.proj(x), dim=-1)
