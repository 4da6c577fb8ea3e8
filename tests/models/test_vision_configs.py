"""The vision teacher/student/data configs compose and build the models they describe."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from kdkit.compose import compose

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("group, name, params", [
    ("teacher", "resnet56", 855_770), ("teacher", "resnet32x4", 7_410_730),
    ("teacher", "wrn_40_2", 2_243_546), ("student", "resnet8", 78_042),
    ("student", "resnet20", 272_474), ("student", "resnet8x4", 1_210_410),
    ("student", "wrn_16_2", 691_674),
])
def test_cifar_models_from_config(group, name, params):
    cfg = compose(["data=cifar10", f"{group}={name}"])
    model = instantiate(cfg[group].model)
    assert count(model) == params  # the 10-class sizes (see test_cifar_resnet / test_wrn)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert cfg[group].normalize is None  # trained here on the data's own statistics


def test_digits_models_from_config():
    cfg = compose(["data=digits", "teacher=digits_cnn", "student=digits_mlp"])
    x = torch.rand(4, cfg.data.in_channels, cfg.data.image_size, cfg.data.image_size)
    assert instantiate(cfg.teacher.model)(x).shape == (4, 10)
    assert instantiate(cfg.student.model)(x).shape == (4, 10)
    assert cfg.teacher.pretrained is False and cfg.teacher.ckpt_path is None


@pytest.mark.parametrize("group", ["teacher", "student"])
@pytest.mark.parametrize("library, name", [("timm", "test_resnet"), ("torchvision", "mobilenet_v3_small")])
def test_hub_configs_take_a_model_name(group, library, name):
    cfg = compose(["data=cifar10", f"{group}={library}", f"{group}.model.name={name}"])
    model = instantiate(cfg[group].model)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert dict(cfg[group].normalize) == IMAGENET  # what hub weights were trained with


def test_data_configs_resolve():
    for data, classes in (("digits", 10), ("cifar10", 10), ("imagefolder", 1000)):
        cfg = compose([f"data={data}"])
        assert cfg.data.num_classes == classes
        assert len(cfg.data.mean) == len(cfg.data.std) == (1 if data == "digits" else 3)
        assert cfg.data._target_.startswith("kdkit.datamodules.")
