"""Model factories: CIFAR ResNets and WRNs of the KD literature, small demo nets, timm/torchvision.

Configs name a factory directly, e.g. ``_target_: kdkit.models.cifar_resnet.resnet56``; any other
``nn.Module`` class on the Python path works the same way.
"""

from kdkit.models.cifar_resnet import (
    CifarResNet,
    resnet8,
    resnet8x4,
    resnet14,
    resnet20,
    resnet32,
    resnet32x4,
    resnet44,
    resnet56,
    resnet110,
)
from kdkit.models.hub import timm_model, torchvision_model
from kdkit.models.small import MLP, ConvNet
from kdkit.models.wrn import WideResNet, wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2

__all__ = [
    "CifarResNet", "ConvNet", "MLP", "WideResNet", "resnet8", "resnet8x4", "resnet14", "resnet20",
    "resnet32", "resnet32x4", "resnet44", "resnet56", "resnet110", "timm_model",
    "torchvision_model", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
]
