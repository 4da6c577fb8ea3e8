"""Weight initialisation shared by kdkit's CNNs and the heads built from them."""

from __future__ import annotations

from torch import nn


def he_init(module: nn.Module) -> nn.Module:
    """He et al. (ICCV 2015) for every convolution of ``module`` (Kaiming-normal, fan-out, ReLU
    gain, as torchvision's and RepDistiller's ResNets) and BatchNorm at weight 1, bias 0; other
    layers are left to their caller. Returns ``module``."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module
