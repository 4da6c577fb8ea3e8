"""DeiT's per-image strong augmentation: random erasing's box and noise, and the options."""

from __future__ import annotations

import pytest
import torch

from kdkit.datamodules.strong_augment import Chain, RandomErasingNoise, strong_augment
from kdkit.errors import KdkitError

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def test_erasing_fills_one_box_with_noise_that_normalises_to_standard_normal():
    erase = RandomErasingNoise(1.0, MEAN, STD)
    image = torch.full((3, 32, 32), 2.0)  # a value no noise pixel hits exactly
    torch.manual_seed(0)
    normalised = []
    for _ in range(200):
        out = erase(image)
        box = (out != image).any(0)
        ys, xs = box.nonzero(as_tuple=True)
        h, w = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        assert int(box.sum()) == h * w  # one rectangle
        assert 0.02 * 1024 * 0.5 <= h * w <= 1024 / 3 * 1.5 and 0.25 <= h / w <= 4.0
        mean, std = torch.tensor(MEAN).view(3, 1), torch.tensor(STD).view(3, 1)
        normalised.append(((out[:, box] - mean) / std).flatten())
    z = torch.cat(normalised)
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02


def test_erasing_probability():
    image = torch.zeros(3, 16, 16)
    torch.manual_seed(0)
    erased = sum(bool((RandomErasingNoise(0.25, MEAN, STD)(image) != 0).any()) for _ in range(800))
    assert 0.2 < erased / 800 < 0.3
    assert torch.equal(RandomErasingNoise(0.0, MEAN, STD)(image), image)


def test_options_build_the_steps_in_deits_order():
    assert strong_augment(0, 9, 0.0, MEAN, STD) == []
    steps = strong_augment(2, 9, 0.25, MEAN, STD)
    assert [type(s).__name__ for s in steps] == ["RandAugment", "RandomErasingNoise"]
    assert (steps[0].num_ops, steps[0].magnitude, steps[1].p) == (2, 9, 0.25)
    assert steps[0].interpolation.value == "bilinear"
    torch.manual_seed(0)
    image = torch.rand(3, 32, 32)
    out = Chain(steps)(image)
    assert out.shape == image.shape and out.dtype == torch.float32


@pytest.mark.parametrize("args, match", [
    ((-1, 9, 0.0), "randaugment_ops=-1"), ((2, 31, 0.0), "randaugment_magnitude=31"),
    ((0, 9, 1.5), "random_erasing=1.5"),
])
def test_bad_options_are_refused(args, match):
    with pytest.raises(KdkitError, match=match):
        strong_augment(*args, MEAN, STD)
