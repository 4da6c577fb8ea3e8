"""CLIP-KD interactive contrastive learning: student embeddings contrasted with the teacher's."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kdkit.distillers.base import DistillContext, Distiller
from kdkit.distillers.clip_common import EmbeddingProjection, clip_parts
from kdkit.losses.contrastive import contrastive_loss
from kdkit.outputs import Outputs


class ClipICL(Distiller):
    """Interactive contrastive learning (ICL) of CLIP-KD (Yang et al., CVPR 2024):

        L_ICL = 1/2 [CE(s * P_v(v_i^S) . t_j^T, j = i) + CE(s * P_t(t_i^S) . v_j^T, j = i)]

    The student's image embedding must pick its own caption among the *teacher's* text
    embeddings of the global batch, and its text embedding its own image among the teacher's
    image embeddings; rows are the local student samples, columns the gathered teacher
    embeddings. ``s`` is a learnable scale of its own (CLIP's parametrisation ``exp(log s)``,
    initialised at 1/0.07, clamped at 100), trained with the student like the projections.
    On transfer data it runs over the captioned pairs alone (an image without a caption has no
    own caption to pick).

    Args:
        weight: multiplier of the loss.
        init_temperature: initial temperature 1/s.
        max_scale: upper bound of s (CLIP clamps its logit scale at 100).
    """

    handles_uncaptioned = True

    def __init__(self, weight: float = 1.0, init_temperature: float = 0.07, max_scale: float = 100.0):
        super().__init__(weight)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_scale = float(max_scale)

    def build(self, student: Outputs, teacher: Outputs, context: DistillContext) -> None:
        s_img, s_txt, _ = clip_parts(student, "clip_icl")
        t_img, t_txt, _ = clip_parts(teacher, "clip_icl")
        self.image_proj = EmbeddingProjection(s_img.shape[-1], t_txt.shape[-1])
        self.text_proj = EmbeddingProjection(s_txt.shape[-1], t_img.shape[-1])

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        s_img, s_txt, _ = clip_parts(student, "clip_icl")
        t_img, t_txt, _ = clip_parts(teacher, "clip_icl")
        scale = self.log_scale.exp().clamp(max=self.max_scale)
        loss = contrastive_loss(self.image_proj(s_img), self.text_proj(s_txt), scale,
                                image_columns=t_img.detach(), text_columns=t_txt.detach(),
                                keep=batch.get("captioned"))
        return {"loss": loss}
