"""TinyCLIP affinity mimicking: match the teacher's image-text similarity distributions."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdkit.distillers.base import Distiller
from kdkit.distillers.clip_common import clip_parts
from kdkit.distributed import gather_nograd
from kdkit.losses.contrastive import mask_columns, masked_mean, similarity_rows
from kdkit.outputs import Outputs


def affinities(image: Tensor, text: Tensor, scale: Tensor | float) -> tuple[Tensor, Tensor]:
    """Image-to-text and text-to-image logits: local rows against the global batch's columns."""
    return similarity_rows(image, text, scale), similarity_rows(text, image, scale)


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """``-sum_j p_T(j) log p_S(j)`` per row."""
    return -(F.softmax(teacher_logits, -1) * F.log_softmax(student_logits, -1)).sum(-1)


def kl_divergence(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """``KL(p_T || p_S) = sum_j p_T(j) [log p_T(j) - log p_S(j)]`` per row."""
    log_t = F.log_softmax(teacher_logits, -1)
    return (log_t.exp() * (log_t - F.log_softmax(student_logits, -1))).sum(-1)


def relational_terms(student: Outputs, teacher: Outputs, who: str, divergence,
                     captioned: Tensor | None = None) -> dict[str, Tensor]:
    """Row-mean of the per-row ``divergence`` between teacher and student in both directions
    (i2t, t2i).

    On transfer data (``captioned``: bool ``[B]``, False for an image without caption) an
    uncaptioned image still has a row of i2t, the teacher's distribution over the batch's real
    captions, which is what the student learns it from; its padding caption is neither an i2t
    column nor a t2i row. Every image stays a t2i column."""
    s_img, s_txt, s_scale = clip_parts(student, who)
    t_img, t_txt, t_scale = clip_parts(teacher, who)
    s_i2t, s_t2i = affinities(s_img, s_txt, s_scale)
    t_i2t, t_t2i = affinities(t_img.detach(), t_txt.detach(), t_scale.detach())
    texts = None if captioned is None else gather_nograd(captioned)
    i2t = divergence(mask_columns(s_i2t, texts), mask_columns(t_i2t, texts)).mean()
    return {"i2t": i2t, "t2i": masked_mean(divergence(s_t2i, t_t2i), captioned)}


class Affinity(Distiller):
    """Affinity mimicking of TinyCLIP (Wu et al., ICCV 2023):

        L = 1/2 [CE(A_S^{I2T}, A_T^{I2T}) + CE(A_S^{T2I}, A_T^{T2I})],
        A^{I2T}_{ij} = softmax_j(s * v_i . t_j)

    a soft cross-entropy between each model's image-to-text and text-to-image similarity
    distributions over the global batch (rows local, columns gathered), each model with its
    own learned logit scale s. On transfer data, images without a caption count as i2t rows
    (``relational_terms``). Returned as two terms "i2t" and "t2i" (each weighted by
    ``weight``; the paper's 1/2 average corresponds to weight 0.5).

    Args:
        weight: multiplier of both terms.
    """

    handles_uncaptioned = True

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        return relational_terms(student, teacher, "affinity", soft_cross_entropy, batch.get("captioned"))
