"""Wide Residual Networks for 32x32 inputs.

Zagoruyko & Komodakis, "Wide Residual Networks" (BMVC 2016): pre-activation basic blocks, three
stages of ``n`` blocks with widths ``16k, 32k, 64k`` after a 16-channel stem; depth = 6n + 4 and
``k`` the widening factor. The variants and layout are those of RepDistiller (Tian et al. 2020),
the reference code of the CIFAR distillation benchmarks (WRN-40-2 teacher, WRN-16-2 / WRN-40-1
students).

Module names for feature taps: ``conv1``, ``block1``, ``block2``, ``block3`` (stages, each an
``nn.Sequential`` of blocks), ``bn1`` + ``relu`` (the final pre-activation), ``avgpool``, ``fc``.
Because blocks are pre-activation, a stage output is a pre-ReLU feature; ``"relu"`` gives the
activated last stage and ``"fc:input"`` the pooled embedding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdkit.models.init import he_init


class WideBasicBlock(nn.Module):
    """Pre-activation block: conv2(dropout(relu(bn2(conv1(relu(bn1(x))))))) + shortcut.

    As in RepDistiller, when the shape changes the 1x1 shortcut convolution reads the
    *activated* input, otherwise the shortcut is the raw input.

    Args:
        in_planes: input channels.
        out_planes: output channels.
        stride: stride of ``conv1`` and of the shortcut.
        drop_rate: dropout between the two convolutions.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(drop_rate)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if in_planes != out_planes or stride != 1:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(act)))))
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nn.Module):
    """WRN-depth-k for CIFAR (Zagoruyko & Komodakis 2016), RepDistiller layout.

    Args:
        depth: ``6n + 4`` (16, 22, 28, 40).
        widen_factor: the width multiplier ``k``.
        num_classes: size of the classifier output.
        drop_rate: dropout inside each block (0 in the KD benchmarks).
        in_channels: input image channels.
    """

    def __init__(self, depth: int, widen_factor: int = 1, num_classes: int = 10,
                 drop_rate: float = 0.0, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"depth must be 6n+4 (10, 16, 22, 28, 40), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = self._stage(widths[0], widths[1], n, 1, drop_rate)
        self.block2 = self._stage(widths[1], widths[2], n, 2, drop_rate)
        self.block3 = self._stage(widths[2], widths[3], n, 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # = AvgPool2d(8) on 32x32 inputs
        self.fc = nn.Linear(widths[3], num_classes)
        self.num_features = widths[3]
        he_init(self)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(in_planes: int, out_planes: int, blocks: int, stride: int, drop_rate: float):
        layers = [WideBasicBlock(in_planes, out_planes, stride, drop_rate)]
        layers += [WideBasicBlock(out_planes, out_planes, 1, drop_rate) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def wrn_16_1(num_classes: int = 10, **kwargs) -> WideResNet:
    return WideResNet(16, 1, num_classes, **kwargs)


def wrn_16_2(num_classes: int = 10, **kwargs) -> WideResNet:
    return WideResNet(16, 2, num_classes, **kwargs)


def wrn_40_1(num_classes: int = 10, **kwargs) -> WideResNet:
    return WideResNet(40, 1, num_classes, **kwargs)


def wrn_40_2(num_classes: int = 10, **kwargs) -> WideResNet:
    return WideResNet(40, 2, num_classes, **kwargs)
