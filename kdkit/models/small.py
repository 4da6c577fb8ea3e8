"""Small networks for the offline demo (8x8 scikit-learn digits) and for tests.

``ConvNet`` is the digits teacher (about 98% test accuracy), ``MLP`` the student. Both end in a
linear classifier named ``fc`` whose input (``"fc:input"``) is the pooled embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class MLP(nn.Module):
    """Flatten, then ``Linear -> ReLU -> Dropout`` per hidden layer, then a linear classifier.

    Module names: ``flatten``, ``hidden`` (``hidden.0``, ``hidden.1``, ... are the activated
    hidden layers, useful as feature taps), ``fc``.

    Args:
        in_features: size of the flattened input (64 for 8x8 grayscale digits).
        hidden: widths of the hidden layers; empty gives multinomial logistic regression.
        num_classes: size of the output.
        dropout: dropout probability after each hidden activation.
    """

    def __init__(self, in_features: int, hidden: Sequence[int] = (64,), num_classes: int = 10,
                 dropout: float = 0.0):
        super().__init__()
        self.flatten = nn.Flatten()
        widths = [int(in_features), *map(int, hidden)]
        self.hidden = nn.Sequential(*[
            nn.Sequential(nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout))
            for a, b in zip(widths[:-1], widths[1:])
        ])
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.hidden(self.flatten(x)))


class ConvNet(nn.Module):
    """A plain CNN: stages of ``conv3x3 -> BatchNorm -> ReLU`` (max-pool between stages),
    global average pooling and a linear classifier.

    Module names: ``layer1`` ... ``layerN`` (one per entry of ``channels``), ``avgpool``,
    ``dropout``, ``fc``. Every stage but the last halves the resolution, so three stages take
    8x8 digits to 2x2.

    Args:
        in_channels: input image channels (1 for grayscale digits).
        channels: output channels of each stage.
        num_classes: size of the output.
        dropout: dropout before the classifier.
    """

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (32, 64, 128),
                 num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        if not channels:
            raise ValueError("ConvNet needs at least one stage in `channels`")
        widths = [int(in_channels), *map(int, channels)]
        self.stage_names = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]), start=1):
            stage = [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU()]
            if i < len(channels):
                stage.append(nn.MaxPool2d(2))
            self.add_module(f"layer{i}", nn.Sequential(*stage))
            self.stage_names.append(f"layer{i}")
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))
