"""Neuron selectivity transfer: match the distributions of the channels' spatial activation
patterns by maximum mean discrepancy."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.distillers.at import DEFAULT_PAIRS, parse_pairs
from kdkit.distillers.map_pairs import MapPairs, paired_maps, pool_to_smaller
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs


def polynomial_mmd(f_s: Tensor, f_t: Tensor, degree: int = 2, c: float = 0.0) -> Tensor:
    """Squared MMD between the student's and the teacher's channels, each channel's spatial map
    L2-normalised, under ``k(x, y) = (x^T y + c)^d``; averaged over the batch."""
    f_s, f_t = pool_to_smaller(f_s, f_t)
    s = F.normalize(f_s.float().flatten(2), dim=2)  # [B, Cs, HW]
    t = F.normalize(f_t.float().flatten(2), dim=2)  # [B, Ct, HW]

    def mean_kernel(a: Tensor, b: Tensor) -> Tensor:  # mean over the batch and all channel pairs
        with torch.autocast(a.device.type, enabled=False):
            return (a @ b.transpose(1, 2) + c).pow(degree).mean()

    return mean_kernel(t, t) + mean_kernel(s, s) - 2 * mean_kernel(s, t)


class NST(MapPairs):
    """Neuron Selectivity Transfer (Huang & Wang, "Like What You Like: Knowledge Distill via
    Neuron Selectivity Transfer", arXiv 1707.01219, 2017).

    Each channel ``i`` of a map ``F`` in ``R^{C x HW}`` is a sample ``f^i = F_i / ||F_i||_2`` of
    the layer's neuron-selectivity distribution; the student's distribution is matched to the
    teacher's by the squared maximum mean discrepancy

        L_MMD^2 = 1/Ct^2 sum_{i,i'} k(f_t^i, f_t^i') + 1/Cs^2 sum_{j,j'} k(f_s^j, f_s^j')
                  - 2/(Ct Cs) sum_{i,j} k(f_s^j, f_t^i),     k(x, y) = (x^T y + c)^d

    with the paper's polynomial kernel ``d = 2, c = 0``, averaged over the batch and summed over
    the pairs of maps (as RepDistiller does, with its stage outputs ``layer1..layer3``). Channel
    counts may differ; a spatial mismatch is resolved by average-pooling the larger map. The
    teacher-teacher term is a constant, kept so that the loss is the MMD itself (>= 0).
    Returns the single term ``"loss"``.

    Args:
        weight: multiplier of the loss (RepDistiller on CIFAR-100: 50).
        pairs: ``[[student_module, teacher_module], ...]`` whose output maps are compared.
        degree: ``d`` of the polynomial kernel (the paper: 2).
        c: ``c`` of the polynomial kernel (the paper: 0).
    """

    def __init__(self, weight: float = 50.0, pairs: Sequence = DEFAULT_PAIRS, degree: int = 2,
                 c: float = 0.0):
        super().__init__(weight)
        self.pairs = parse_pairs(pairs, "nst")
        if int(degree) != degree or degree < 1:
            raise KdkitError(f"nst.degree must be a whole number >= 1, got {degree}")
        self.degree, self.c = int(degree), float(c)

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        maps = paired_maps(student, teacher, self.pairs, "nst")
        return {"loss": sum(polynomial_mmd(s, t, self.degree, self.c) for s, t in maps)}

    def extra_repr(self) -> str:
        return f"weight={self.weight}, pairs={self.pairs}, degree={self.degree}, c={self.c}"
