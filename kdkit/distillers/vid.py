"""Variational information distillation: maximise a Gaussian lower bound on the mutual
information between student and teacher features."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.distillers.at import DEFAULT_PAIRS, parse_pairs
from kdkit.distillers.base import DistillContext
from kdkit.distillers.map_pairs import MapPairs, paired_maps, pool_to_smaller
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs


def softplus_inverse(y: float) -> float:
    """``a`` with ``log(1 + exp(a)) = y`` (``y > 0``)."""
    return y + math.log(-math.expm1(-y))


def gaussian_nll(mean: Tensor, var: Tensor, target: Tensor) -> Tensor:
    """``mean over elements of 0.5 * ((t - mu)^2 / var + log var)``; ``var`` is ``[C]`` per channel."""
    var = var.view(1, -1, *([1] * (mean.dim() - 2)))
    return (0.5 * ((target - mean).pow(2) / var + var.log())).mean()


def regressor(c_in: int, c_mid: int, c_out: int) -> nn.Sequential:
    """VID's mean regressor: three 1x1 convolutions (no bias) with ReLUs in between."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_mid, 1, bias=False), nn.ReLU(),
        nn.Conv2d(c_mid, c_mid, 1, bias=False), nn.ReLU(),
        nn.Conv2d(c_mid, c_out, 1, bias=False),
    )


class VID(MapPairs):
    """Variational Information Distillation (Ahn, Hu, Damianou, Lawrence & Dai, CVPR 2019).

    For each layer pair the student feature ``s`` predicts a Gaussian over the teacher feature
    ``t``, channel ``n`` at position ``(h, w)``:

        q(t | s) = N(t_{n,h,w}; mu_{n,h,w}(s), sigma_n^2),   sigma_n^2 = log(1 + exp(alpha_n)) + eps
        L_VID = sum over pairs of mean_{b, n, h, w} [ log sigma_n + (t - mu(s))^2 / (2 sigma_n^2) ]

    (the negative log-likelihood without the constant ``log sqrt(2 pi)``), where ``mu`` is a
    trainable regressor (three 1x1 convolutions with ReLUs, hidden width = teacher channels as in
    RepDistiller) and ``alpha_n`` a trainable per-channel parameter initialised so that
    ``sigma_n^2 = init_pred_var``. Minimising it maximises the variational lower bound on the
    mutual information ``I(t; s)``. When the spatial sizes differ the larger map is
    average-pooled to the smaller one first.

    Differences from the paper: like RepDistiller and mdistiller, the NLL is *averaged* over
    batch, channels and positions (the paper sums over channels and positions), so the weight
    is RepDistiller's ``-b 1``. The paper's variant for the logit layer (a per-class mean from
    the student's logits) is not implemented: pairs are 4-D maps. Returns the single term
    ``"loss"``.

    Args:
        weight: multiplier of the loss (RepDistiller / mdistiller CIFAR-100: 1.0).
        pairs: ``[[student_module, teacher_module], ...]`` of 4-D maps ``[B, C, H, W]``.
        init_pred_var: initial variance ``sigma^2`` of every channel (RepDistiller: 5.0).
        eps: floor ``eps`` added to the softplus variance (RepDistiller: 1e-5).
    """

    def __init__(self, weight: float = 1.0, pairs: Sequence = DEFAULT_PAIRS,
                 init_pred_var: float = 5.0, eps: float = 1e-5):
        super().__init__(weight)
        self.pairs = parse_pairs(pairs, "vid")
        if eps < 0 or init_pred_var <= eps:
            raise KdkitError(f"vid: need eps >= 0 and init_pred_var > eps, got "
                             f"init_pred_var={init_pred_var}, eps={eps}")
        self.init_pred_var, self.eps = float(init_pred_var), float(eps)
        self.regressors = nn.ModuleList()
        self.log_scales = nn.ParameterList()

    def build(self, student: Outputs, teacher: Outputs, context: DistillContext) -> None:
        self.regressors, self.log_scales = nn.ModuleList(), nn.ParameterList()
        alpha = softplus_inverse(self.init_pred_var - self.eps)
        for f_s, f_t in paired_maps(student, teacher, self.pairs, "vid"):
            c_s, c_t = f_s.shape[1], f_t.shape[1]
            self.regressors.append(regressor(c_s, c_t, c_t).to(f_s.device))
            self.log_scales.append(nn.Parameter(torch.full((c_t,), alpha, device=f_s.device)))

    def variances(self) -> list[Tensor]:
        """``sigma^2 = softplus(alpha) + eps`` of every pair, ``[C_t]`` each."""
        return [F.softplus(a.float()) + self.eps for a in self.log_scales]

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        if len(self.regressors) != len(self.pairs):
            raise RuntimeError("vid: build() must run (on a probe forward) before forward()")
        total = 0.0
        for (f_s, f_t), reg, var in zip(paired_maps(student, teacher, self.pairs, "vid"), self.regressors, self.variances()):
            f_s, f_t = pool_to_smaller(f_s, f_t)
            total = total + gaussian_nll(reg(f_s).float(), var, f_t.float())
        return {"loss": total}

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, pairs={self.pairs}, init_pred_var={self.init_pred_var}, "
                f"eps={self.eps}")
