"""Tiny models and batches for tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """conv -> relu -> pool -> fc; module names: conv, act, pool, fc."""

    def __init__(self, width: int = 4, num_classes: int = 3, in_channels: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


class BNNet(TinyNet):
    """TinyNet with a BatchNorm (running statistics reveal train-mode forwards)."""

    def __init__(self, width: int = 4, num_classes: int = 3):
        super().__init__(width, num_classes)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x):
        return self.fc(self.pool(self.act(self.bn(self.conv(x)))).flatten(1))


def image_batch(n: int = 6, num_classes: int = 3, size: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(n, 1, size, size, generator=g),
        "label": torch.randint(0, num_classes, (n,), generator=g),
        "index": torch.arange(n),
    }
