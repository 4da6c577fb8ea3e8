"""CIFAR ResNets of the knowledge-distillation literature.

He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), section 4.2: a 3x3 stem,
three stages of ``n`` basic blocks at 32x32, 16x16 and 8x8, global average pooling and a linear
classifier; depth = 6n + 2. Widths follow the RepDistiller code base (Tian et al., "Contrastive
Representation Distillation", ICLR 2020) that CRD, DKD, DIST and most later papers report on:
``resnetD`` uses widths 16-16-32-64 and ``resnetDx4`` uses 32-64-128-256.

Module names are chosen for feature taps: ``conv1``, ``bn1``, ``relu``, ``layer1``, ``layer2``,
``layer3``, ``avgpool``, ``fc``. The input of ``fc`` (``"fc:input"``) is the pooled embedding.
Every ReLU is a separate, non in-place module, so ``"layer3.<last>.relu2:input"`` is the
pre-activation output of a stage (RepDistiller's ``preact=True`` features).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdkit.models.init import he_init


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation residual block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

    Args:
        in_planes: input channels.
        planes: output channels.
        stride: stride of ``conv1`` (2 halves the resolution at the start of a stage).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        # Projection shortcut (option B of He et al.) only where the shape changes.
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs (He et al. 2016), as parameterised in RepDistiller.

    Args:
        depth: total number of weighted layers, ``6n + 2`` (8, 14, 20, 32, 44, 56, 110).
        widths: channels of the stem and of the three stages, e.g. ``(16, 16, 32, 64)``.
        num_classes: size of the classifier output.
        in_channels: input image channels.
    """

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth must be 6n+2 (8, 14, 20, 32, 44, 56, 110), got {depth}")
        if len(widths) != 4:
            raise ValueError(f"widths must list the stem and 3 stage widths, got {list(widths)}")
        n = (depth - 2) // 6
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = self._stage(widths[0], widths[1], n, stride=1)
        self.layer2 = self._stage(widths[1], widths[2], n, stride=2)
        self.layer3 = self._stage(widths[2], widths[3], n, stride=2)
        # Adaptive pooling equals RepDistiller's AvgPool2d(8) on 32x32 inputs and also
        # accepts other resolutions.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        self.num_features = widths[3]
        he_init(self)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


_SMALL = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)


def resnet8(num_classes: int = 10, **kwargs) -> CifarResNet:
    return CifarResNet(8, _SMALL, num_classes, **kwargs)


def resnet14(num_classes: int = 10, **kwargs) -> CifarResNet:
    return CifarResNet(14, _SMALL, num_classes, **kwargs)


def resnet20(num_classes: int = 10, **kwargs) -> CifarResNet:
    return CifarResNet(20, _SMALL, num_classes, **kwargs)


def resnet32(num_classes: int = 10, **kwargs) -> CifarResNet:
    return CifarResNet(32, _SMALL, num_classes, **kwargs)


def resnet44(num_classes: int = 10, **kwargs) -> CifarResNet:
    return CifarResNet(44, _SMALL, num_classes, **kwargs)


def resnet56(num_classes: int = 10, **kwargs) -> CifarResNet:
    return CifarResNet(56, _SMALL, num_classes, **kwargs)


def resnet110(num_classes: int = 10, **kwargs) -> CifarResNet:
    return CifarResNet(110, _SMALL, num_classes, **kwargs)


def resnet8x4(num_classes: int = 10, **kwargs) -> CifarResNet:
    return CifarResNet(8, _X4, num_classes, **kwargs)


def resnet32x4(num_classes: int = 10, **kwargs) -> CifarResNet:
    return CifarResNet(32, _X4, num_classes, **kwargs)
