"""CLIP-KD contrastive relational distillation: KL between contrastive distributions."""

from __future__ import annotations

from torch import Tensor

from kdkit.distillers.affinity import kl_divergence, relational_terms
from kdkit.distillers.base import Distiller
from kdkit.outputs import Outputs


class ClipCRD(Distiller):
    """Contrastive relational distillation (CRD) of CLIP-KD (Yang et al., CVPR 2024):

        L_CRD = KL(p_T^{I2T} || p_S^{I2T}) + KL(p_T^{T2I} || p_S^{T2I}),
        p^{I2T}_{ij} = softmax_j(s * v_i . t_j)

    over the global batch (rows local, columns gathered), each model with its own logit scale.
    Its gradient equals TinyCLIP's affinity mimicking (``Affinity``): the two differ by the
    teacher's entropy, a constant for the student; KL is reported because it is 0 at a perfect
    match. Returned as terms "i2t" and "t2i" (CLIP-KD averages them: weight 0.5).

    On transfer data an image without a caption still learns the teacher's distribution over
    the batch's captions (its i2t row; ``affinity.relational_terms``).

    Args:
        weight: multiplier of both terms.
    """

    handles_uncaptioned = True

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        return relational_terms(student, teacher, "clip_crd", kl_divergence, batch.get("captioned"))
