"""The per-image half of DeiT's strong augmentation: RandAugment and random erasing.

DeiT (Touvron et al. ICML 2021, Table 8) trains its students with RandAugment (Cubuk et al. 2020;
``rand-m9-mstd0.5-inc1`` in timm: 2 ops of magnitude 9) and random erasing (Zhong et al. AAAI 2020,
probability 0.25), on top of the crop and flip, plus the batch-level Mixup / CutMix of
``kdkit.datamodules.batch_mix``. The images here are float ``[C, H, W]`` in [0, 1], before the
task normalises them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from kdkit.errors import KdkitError


class RandomErasingNoise:
    """Random erasing (Zhong et al. AAAI 2020) with per-pixel noise, as timm's ``mode='pixel'``.

    With probability ``p`` one box is erased: its area a uniform ``[0.02, 1/3]`` share of the
    image, its aspect ratio log-uniform in ``[0.3, 3.3]`` (up to 10 tries to fit). The box is filled
    with ``mean + std * N(0, 1)`` per pixel and channel, so that after the task's normalisation
    ``(x - mean) / std`` it holds standard normal noise, as in timm, where erasing runs after
    ``Normalize``.

    Args:
        p: probability of erasing a box in an image.
        mean, std: the data's per-channel statistics (those the task normalises with).
    """

    def __init__(self, p: float, mean: Sequence[float], std: Sequence[float],
                 area: tuple[float, float] = (0.02, 1 / 3), ratio: tuple[float, float] = (0.3, 3.3)):
        if not 0.0 <= p <= 1.0:
            raise KdkitError(f"data.random_erasing={p} must be a probability in [0, 1]")
        self.p = float(p)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.area = area
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def __call__(self, image: Tensor) -> Tensor:
        if float(torch.rand(())) >= self.p:
            return image
        c, h, w = image.shape
        for _ in range(10):
            share = float(torch.empty(()).uniform_(*self.area))
            aspect = math.exp(float(torch.empty(()).uniform_(*self.log_ratio)))
            bh, bw = round(math.sqrt(share * h * w * aspect)), round(math.sqrt(share * h * w / aspect))
            if 0 < bh < h and 0 < bw < w:
                top, left = int(torch.randint(0, h - bh + 1, ())), int(torch.randint(0, w - bw + 1, ()))
                out = image.clone()
                noise = torch.randn(c, bh, bw)
                out[:, top:top + bh, left:left + bw] = self.mean + self.std * noise
                return out
        return image


def strong_augment(randaugment_ops: int, randaugment_magnitude: int, random_erasing: float,
                   mean: Sequence[float], std: Sequence[float]) -> list[Callable[[Tensor], Tensor]]:
    """The transforms these options ask for, in DeiT's order (RandAugment, then erasing); empty
    when ``randaugment_ops`` is 0 and ``random_erasing`` is 0."""
    from torchvision.transforms import v2

    if int(randaugment_ops) < 0:
        raise KdkitError(f"data.randaugment_ops={randaugment_ops} must be >= 0 (0 switches RandAugment off)")
    if not 0 <= int(randaugment_magnitude) <= 30:
        raise KdkitError(f"data.randaugment_magnitude={randaugment_magnitude} must be in [0, 30] "
                         "(torchvision's 31 magnitude bins; DeiT uses 9)")
    steps: list[Callable[[Tensor], Tensor]] = []
    if randaugment_ops:
        # bilinear for the geometric ops, as timm's (torchvision's default is nearest)
        steps.append(v2.RandAugment(num_ops=int(randaugment_ops), magnitude=int(randaugment_magnitude),
                                    interpolation=v2.InterpolationMode.BILINEAR))
    if random_erasing:
        steps.append(RandomErasingNoise(random_erasing, mean, std))
    return steps


class Chain:
    """Apply ``steps`` in order to one image (a picklable ``Compose`` for plain callables)."""

    def __init__(self, steps: Sequence[Callable[[Tensor], Tensor]]):
        self.steps = list(steps)

    def __call__(self, image: Tensor) -> Tensor:
        for step in self.steps:
            image = step(image)
        return image

    def __repr__(self) -> str:
        return f"Chain({self.steps})"
