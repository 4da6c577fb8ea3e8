"""CLIP-KD feature distillation: mimic the teacher's image and text embeddings."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdkit.distillers.base import DistillContext, Distiller
from kdkit.distillers.clip_common import EmbeddingProjection, clip_parts
from kdkit.losses.contrastive import masked_mean
from kdkit.outputs import Outputs


def feature_mimicry(student: Tensor, teacher: Tensor, keep: Tensor | None = None) -> Tensor:
    """Mean over samples (the ``keep`` rows, ``masked_mean``) of ``||s_k - t_k||^2``."""
    return masked_mean((student - teacher).pow(2).sum(-1), keep)


class ClipFD(Distiller):
    """Feature distillation (FD) of CLIP-KD (Yang et al., CVPR 2024), the strongest single
    loss in that paper's ablation:

        L_FD = 1/|B| sum_k ||v_k^T - P_v(v_k^S)||^2 + ||t_k^T - P_t(t_k^S)||^2

    on L2-normalised image (v) and text (t) embeddings; P_v, P_t are linear projections to the
    teacher's width when it differs (else identity), re-normalised. The loss is a mean of
    per-sample terms, so DDP's gradient averaging already gives the global-batch value: no
    cross-rank gather is needed. CLIP-KD's weight 2000 multiplies an element-wise mean, i.e.
    about 2000 / D on this per-sample sum (about 4 for D = 512).

    On transfer data an image without a caption learns the teacher's image embedding; the text
    term averages over the captioned rows alone.

    Args:
        weight: multiplier of both terms ("image", "text").
    """

    handles_uncaptioned = True

    def build(self, student: Outputs, teacher: Outputs, context: DistillContext) -> None:
        s_img, s_txt, _ = clip_parts(student, "clip_fd")
        t_img, t_txt, _ = clip_parts(teacher, "clip_fd")
        self.image_proj = EmbeddingProjection(s_img.shape[-1], t_img.shape[-1])
        self.text_proj = EmbeddingProjection(s_txt.shape[-1], t_txt.shape[-1])

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        s_img, s_txt, _ = clip_parts(student, "clip_fd")
        t_img, t_txt, _ = clip_parts(teacher, "clip_fd")
        return {
            "image": feature_mimicry(self.image_proj(s_img), F.normalize(t_img, dim=-1)),
            "text": feature_mimicry(self.text_proj(s_txt), F.normalize(t_txt, dim=-1), batch.get("captioned")),
        }
