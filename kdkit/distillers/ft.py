"""Factor transfer: the student's translated factors mimic the teacher's paraphrased factors."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.distillers.base import DistillContext, feature
from kdkit.distillers.map_pairs import MapPairs, pool_to_smaller
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs


def leaky_conv_stack(conv: type[nn.Module], widths: list[int]) -> nn.Sequential:
    """3x3 stride-1 (transposed) convolutions through ``widths``, each followed by LeakyReLU(0.1)."""
    layers: list[nn.Module] = []
    for c_in, c_out in zip(widths, widths[1:]):
        layers += [conv(c_in, c_out, kernel_size=3, stride=1, padding=1), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """The paper's paraphraser: a convolutional autoencoder on the teacher's map ``[B, C, H, W]``
    whose code, ``[B, k C, H, W]``, is the teacher factor (3 conv encoder, 3 transposed-conv
    decoder, LeakyReLU 0.1, no BatchNorm, as in the authors' code)."""

    def __init__(self, channels: int, factor_channels: int):
        super().__init__()
        self.encoder = leaky_conv_stack(nn.Conv2d, [channels, channels, factor_channels, factor_channels])
        self.decoder = leaky_conv_stack(nn.ConvTranspose2d, [factor_channels, factor_channels, channels, channels])


def factor_distance(factor_s: Tensor, factor_t: Tensor) -> Tensor:
    """``mean | F_S / ||F_S||_2 - F_T / ||F_T||_2 |`` with each sample's factor vectorised; the
    map with the larger spatial size is first average-pooled to the other's."""
    factor_s, factor_t = pool_to_smaller(factor_s, factor_t)
    unit_s = F.normalize(factor_s.float().flatten(1), dim=1)
    unit_t = F.normalize(factor_t.float().flatten(1), dim=1)
    return (unit_s - unit_t).abs().mean()


class FT(MapPairs):
    """Factor Transfer (Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression via
    Factor Transfer", NeurIPS 2018).

        F_T = P_enc(x_t),   F_S = Tr(x_s)
        L_FT = || F_T / ||F_T||_2 - F_S / ||F_S||_2 ||_p,   p = 1
        L_rec = || x_t - P(x_t) ||^2

    on the last feature maps ``x_t`` (teacher) and ``x_s`` (student). The paraphraser ``P`` is
    an autoencoder whose code has ``paraphrase_rate * C_t`` channels; the translator ``Tr`` is a
    3-layer conv net from the student's map to that code. As in the authors' code, the L1 norm
    is a mean over the elements of the vectorised, L2-normalised factors, and the teacher
    factor is detached, so ``L_FT`` trains only the student and the translator.

    What kdkit does differently: the paper pre-trains the paraphraser by reconstruction on the
    frozen teacher before the student's training starts, which a distiller cannot (``build``
    sees one probe batch, no data). kdkit trains the paraphraser *jointly*, from the first step,
    on ``L_rec`` (MSE, the paper's squared norm; the authors' code uses L1) of the detached
    teacher map, returned as its own term. Its teacher factors therefore move during the first
    epochs instead of being fixed from the start. Both terms are multiplied by ``weight``;
    ``reconstruction_weight: 1/weight`` gives the paraphraser the plain reconstruction loss of
    the paper's pre-training. Returns ``"factor"`` (L_FT) and ``"reconstruction"``
    (reconstruction_weight * L_rec).

    Args:
        weight: multiplier of both terms (beta; the authors' CIFAR-10 code: 500).
        student_feature: student module whose output map is translated (e.g. "layer3").
        teacher_feature: teacher module whose output map is paraphrased (e.g. "layer3").
        paraphrase_rate: k, factor channels = round(k * teacher channels) (the paper: 0.5).
        reconstruction_weight: multiplier of L_rec before ``weight`` (default 1/500).
    """

    def __init__(self, weight: float = 500.0, student_feature: str = "layer3",
                 teacher_feature: str = "layer3", paraphrase_rate: float = 0.5,
                 reconstruction_weight: float = 0.002):
        super().__init__(weight)
        self.student_feature = str(student_feature)
        self.teacher_feature = str(teacher_feature)
        self.pairs = [(self.student_feature, self.teacher_feature)]  # the taps (MapPairs)
        if not 0 < paraphrase_rate:
            raise KdkitError(f"ft.paraphrase_rate must be > 0, got {paraphrase_rate}")
        if not reconstruction_weight > 0:
            raise KdkitError(f"ft.reconstruction_weight must be > 0 (the paraphraser learns only "
                             f"from it), got {reconstruction_weight}")
        self.paraphrase_rate = float(paraphrase_rate)
        self.reconstruction_weight = float(reconstruction_weight)
        self.paraphraser: Paraphraser | None = None
        self.translator: nn.Sequential | None = None

    def _maps(self, student: Outputs, teacher: Outputs) -> tuple[Tensor, Tensor]:
        s = feature(student, self.student_feature, "ft")
        t = feature(teacher, self.teacher_feature, "ft")
        if s.dim() != 4 or t.dim() != 4:
            raise KdkitError(f"ft: {self.student_feature} / {self.teacher_feature} must be maps "
                             f"[B, C, H, W], got student shape {tuple(s.shape[1:])} and teacher "
                             f"shape {tuple(t.shape[1:])}")
        return s, t.detach()

    def build(self, student: Outputs, teacher: Outputs, context: DistillContext) -> None:
        s, t = self._maps(student, teacher)
        factor_channels = max(1, round(self.paraphrase_rate * t.shape[1]))
        self.paraphraser = Paraphraser(t.shape[1], factor_channels).to(t.device)
        self.translator = leaky_conv_stack(nn.Conv2d, [s.shape[1], s.shape[1], factor_channels,
                                                       factor_channels]).to(s.device)

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        if self.paraphraser is None or self.translator is None:
            raise RuntimeError("ft: build() must run (on a probe forward) before forward()")
        s, t = self._maps(student, teacher)
        factor_t = self.paraphraser.encoder(t.float())
        reconstruction = self.paraphraser.decoder(factor_t)
        return {
            "factor": factor_distance(self.translator(s), factor_t.detach()),
            "reconstruction": self.reconstruction_weight * F.mse_loss(reconstruction.float(), t.float()),
        }

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, student_feature={self.student_feature!r}, "
                f"teacher_feature={self.teacher_feature!r}, paraphrase_rate={self.paraphrase_rate}, "
                f"reconstruction_weight={self.reconstruction_weight}")
