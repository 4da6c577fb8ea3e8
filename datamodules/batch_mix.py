"""Mixup and CutMix: training batches whose images (and labels) are mixtures of two samples.

Mixup (Zhang et al. ICLR 2018) blends whole images, ``x~ = lam x_i + (1 - lam) x_j`` with
``lam ~ Beta(alpha, alpha)``; CutMix (Yun et al. ICCV 2019) pastes a box of ``x_j`` into ``x_i``,
the box covering ``1 - lam`` of the image (its side ``sqrt(1 - lam)`` of the image's, its centre
uniform, clipped at the border, and ``lam`` recomputed from the clipped area). Either way the label
becomes ``y~ = lam onehot(y_i) + (1 - lam) onehot(y_j)``. DeiT's recipe (Touvron et al. ICML 2021)
uses both, one of the two per batch (CutMix with probability ``switch_prob``), and its teacher sees
the mixed image too, as every kdkit teacher does: mixing happens in the loader, before the step.

As in timm's batch mode, sample ``i`` is paired with sample ``B - 1 - i`` of the same batch (the
batch in reverse), and one ``lam`` serves the whole batch. Draws come from torch's global RNG,
which Lightning's ``seed_everything`` and the DataLoader (per worker) seed, so runs repeat.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.data import default_collate

from kdkit.errors import KdkitError


class BatchMix:
    """Mixup / CutMix on collated ``{"image": [B, C, H, W], "label": long [B], ...}`` batches;
    returns the batch with mixed images and soft labels ``float [B, num_classes]``.

    Args:
        mixup_alpha: Beta parameter of Mixup's ``lam``; 0 switches Mixup off.
        cutmix_alpha: Beta parameter of CutMix's ``lam``; 0 switches CutMix off.
        prob: probability that a batch is mixed at all (an unmixed batch still gets one-hot
            soft labels, so every batch has the same label format).
        switch_prob: with both on, the probability that a batch gets CutMix rather than Mixup.
    """

    def __init__(self, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5):
        for name, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if not value >= 0:
                raise KdkitError(f"data.{name}={value} must be >= 0 (0 switches it off)")
        for name, value in (("mix_prob", prob), ("mix_switch_prob", switch_prob)):
            if not 0.0 <= value <= 1.0:
                raise KdkitError(f"data.{name}={value} must be a probability in [0, 1]")
        if mixup_alpha == 0 and cutmix_alpha == 0:
            raise KdkitError("BatchMix needs data.mixup_alpha > 0 or data.cutmix_alpha > 0")
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.prob = float(prob)
        self.switch_prob = float(switch_prob)

    def __repr__(self) -> str:
        return (f"BatchMix(mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, "
                f"prob={self.prob}, switch_prob={self.switch_prob})")

    def __call__(self, batch: dict, num_classes: int) -> dict:
        images, labels = batch["image"], batch["label"]
        if labels.dim() != 1 or bool((labels < 0).any()):
            raise KdkitError("Mixup/CutMix needs one class label per sample (transfer rows without a "
                             "label cannot be mixed)")
        soft = torch.nn.functional.one_hot(labels, num_classes).float()
        if float(torch.rand(())) >= self.prob:
            return {**batch, "label": soft}
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or float(torch.rand(())) < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        partner = images.flip(0)
        if use_cutmix:
            top, bottom, left, right = cutmix_box(images.shape[-2], images.shape[-1], lam)
            mixed = images.clone()
            mixed[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / (images.shape[-2] * images.shape[-1])
        else:
            mixed = images * lam + partner * (1.0 - lam)
        return {**batch, "image": mixed, "label": soft * lam + soft.flip(0) * (1.0 - lam)}


def cutmix_box(height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of a box whose sides are ``sqrt(1 - lam)`` of the image's,
    centred uniformly at random, clipped to the image (so it may cover less than ``1 - lam``)."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(torch.randint(0, height, ())), int(torch.randint(0, width, ()))
    return (max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height),
            max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width))


class MixingCollate:
    """A DataLoader ``collate_fn``: ``default_collate``, then ``mix`` (picklable, for workers)."""

    def __init__(self, mix: BatchMix, num_classes: int):
        self.mix = mix
        self.num_classes = int(num_classes)

    def __call__(self, samples: list) -> dict:
        return self.mix(default_collate(samples), self.num_classes)
