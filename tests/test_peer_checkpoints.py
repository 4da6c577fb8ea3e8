"""Teachers from torchdistill, RepDistiller and mdistiller load into kdkit's CIFAR ResNets
(``kdkit.peer_checkpoints``, ``teacher.ckpt_layout``) and compute the same function."""

from __future__ import annotations

import argparse
import copy

import pytest
import torch
from omegaconf import OmegaConf

from kdkit.checkpoints import load_weights
from kdkit.errors import KdkitError
from kdkit.models import cifar_resnet
from kdkit.pipeline import load_teacher

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def repdistiller_keys(depth: int, widths: tuple[int, int, int, int]) -> list[str]:
    """RepDistiller's ``models/resnet.py`` state_dict keys in registration order, written from its
    source (mdistiller's ``mdistiller/models/cifar/resnet.py`` is the same network): ``ResNet``
    registers conv1, bn1, layer1..3, fc; ``BasicBlock`` conv1, bn1, conv2, bn2, downsample;
    ``_make_layer`` gives block 0 a downsample (1x1 conv, BN) when stride != 1 or
    inplanes != planes."""
    keys = ["conv1.weight", *(f"bn1.{b}" for b in BN)]
    inplanes, n = widths[0], (depth - 2) // 6
    for stage, planes in enumerate(widths[1:], start=1):
        for block in range(n):
            p = f"layer{stage}.{block}"
            keys += [f"{p}.conv1.weight", *(f"{p}.bn1.{b}" for b in BN),
                     f"{p}.conv2.weight", *(f"{p}.bn2.{b}" for b in BN)]
            stride = 2 if stage > 1 and block == 0 else 1
            if block == 0 and (stride != 1 or inplanes != planes):
                keys += [f"{p}.downsample.0.weight", *(f"{p}.downsample.1.{b}" for b in BN)]
            inplanes = planes
    return keys + ["fc.weight", "fc.bias"]


def trained_looking(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BN statistics and affine terms, so eval-mode outputs depend on every tensor."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.num_batches_tracked.fill_(7)
    return model.eval()


def as_repdistiller(model: torch.nn.Module, depth: int, widths) -> dict:
    """``model``'s tensors under RepDistiller's names, paired by registration order."""
    values = list(model.state_dict().values())
    keys = repdistiller_keys(depth, widths)
    assert len(keys) == len(values)
    return dict(zip(keys, values))


def same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("depth", [8, 20])
def test_torchdistill_resnet_loads_and_computes_the_same(tmp_path, depth):
    resnet = pytest.importorskip("torchdistill.models.classification.resnet",
                                 reason="torchdistill not installed (pip install kdkit[peers])")
    torch.manual_seed(depth)
    theirs = trained_looking(resnet.resnet(depth, 10, False, False))
    path = tmp_path / f"cifar10-resnet{depth}.pt"  # as its released weights: a bare state_dict
    torch.save(theirs.state_dict(), path)
    ours = load_weights(getattr(cifar_resnet, f"resnet{depth}")(10), path, layout="torchdistill").eval()
    same_function(ours, theirs)


def same_function(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """Equal outputs in float64 (atol 1e-6). In float32 the pooling's summation order differs
    (kdkit's AdaptiveAvgPool2d(1) vs their AvgPool2d(8)) by a few ulp; with their pooling
    swapped in, the float32 outputs are bit-identical."""
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours64, theirs64 = copy.deepcopy(ours).double(), copy.deepcopy(theirs).double()
        torch.testing.assert_close(ours64(x.double()), theirs64(x.double()), rtol=0, atol=1e-6)
        same_pool = copy.deepcopy(ours)
        same_pool.avgpool = torch.nn.AvgPool2d(8)
        assert torch.equal(same_pool(x), theirs(x))


def test_torchdistill_save_ckpt_file_needs_trust(tmp_path):
    resnet = pytest.importorskip("torchdistill.models.classification.resnet",
                                 reason="torchdistill not installed (pip install kdkit[peers])")
    theirs = trained_looking(resnet.resnet20(num_classes=10))
    opt = torch.optim.SGD(theirs.parameters(), lr=0.1)
    path = tmp_path / "kd.pt"  # what torchdistill's main_util.save_ckpt writes
    torch.save({"model": theirs.state_dict(), "optimizer": opt.state_dict(), "best_value": 91.2,
                "lr_scheduler": None, "args": argparse.Namespace(config="kd.yaml")}, path)
    with pytest.raises(KdkitError, match="trust_checkpoint"):
        load_weights(cifar_resnet.resnet20(10), path, layout="torchdistill")
    ours = load_weights(cifar_resnet.resnet20(10), path, layout="torchdistill", trust=True)
    same_function(ours.eval(), theirs)


@pytest.mark.parametrize("name,depth,widths", [("resnet8", 8, (16, 16, 32, 64)),
                                               ("resnet56", 56, (16, 16, 32, 64)),
                                               ("resnet8x4", 8, (32, 64, 128, 256)),
                                               ("resnet32x4", 32, (32, 64, 128, 256))])
@pytest.mark.parametrize("layout", ["repdistiller", "mdistiller"])
def test_repdistiller_and_mdistiller_checkpoints_load(tmp_path, layout, name, depth, widths):
    torch.manual_seed(0)
    source = trained_looking(getattr(cifar_resnet, name)(100))
    opt = torch.optim.SGD(source.parameters(), lr=0.05, momentum=0.9)
    path = tmp_path / f"{name}_best.pth"  # train_teacher.py's {'model', 'epoch', 'best_acc', 'optimizer'}
    torch.save({"epoch": 240, "model": as_repdistiller(source, depth, widths),
                "best_acc": torch.tensor(73.5), "optimizer": opt.state_dict()}, path)
    same_model(load_weights(getattr(cifar_resnet, name)(100), path, layout=layout), source)


def test_mdistiller_distiller_checkpoint_gives_the_student(tmp_path):
    student = trained_looking(cifar_resnet.resnet8x4(100), seed=1)
    teacher = trained_looking(cifar_resnet.resnet32x4(100), seed=2)
    model = {f"module.student.{k}": v for k, v in as_repdistiller(student, 8, (32, 64, 128, 256)).items()}
    model |= {f"module.teacher.{k}": v for k, v in as_repdistiller(teacher, 32, (32, 64, 128, 256)).items()}
    path = tmp_path / "latest"  # mdistiller trainer: the DataParallel-wrapped distiller
    torch.save({"epoch": 240, "model": model, "best_acc": 76.3}, path)
    same_model(load_weights(cifar_resnet.resnet8x4(100), path, layout="mdistiller"), student)


def test_load_teacher_reads_ckpt_layout(tmp_path):
    source = trained_looking(cifar_resnet.resnet20(10))
    path = tmp_path / "resnet20_vanilla.pth"
    torch.save({"model": as_repdistiller(source, 20, (16, 16, 32, 64))}, path)
    tcfg = OmegaConf.create({"model": {"_target_": "kdkit.models.cifar_resnet.resnet20", "num_classes": 10},
                             "ckpt_path": str(path), "ckpt_layout": "repdistiller"})
    model, trained = load_teacher(None, tcfg, tmp_path)
    assert trained
    same_model(model, source)


def test_wrong_layout_and_unmapped_keys_are_one_line_errors(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(cifar_resnet.resnet20(10).state_dict(), path)
    with pytest.raises(KdkitError, match="unknown ckpt_layout='timm'; choose one of torchdistill"):
        load_weights(cifar_resnet.resnet20(10), path, layout="timm")
    bottleneck = {"conv1.weight": torch.zeros(16, 3, 3, 3), "layer1.0.conv3.weight": torch.zeros(64, 16, 1, 1),
                  "layer1.0.bn3.weight": torch.zeros(64), "layer4.0.conv1.weight": torch.zeros(1)}
    torch.save({"model": bottleneck}, path)
    with pytest.raises(KdkitError) as err:
        load_weights(cifar_resnet.resnet20(10), path, layout="repdistiller")
    message = str(err.value)
    assert "\n" not in message and "3 of 4 keys do not map" in message and "layer1.0.conv3.weight" in message
    tcfg = OmegaConf.create({"model": {"_target_": "kdkit.models.cifar_resnet.resnet20"},
                             "ckpt_layout": "torchdistill"})
    with pytest.raises(KdkitError, match="needs ckpt_path"):
        load_teacher(None, tcfg, tmp_path)


def test_depth_mismatch_is_refused_by_the_model(tmp_path):
    path = tmp_path / "resnet56.pth"
    torch.save({"model": as_repdistiller(cifar_resnet.resnet56(100), 56, (16, 16, 32, 64))}, path)
    with pytest.raises(KdkitError, match="does not fit CifarResNet"):
        load_weights(cifar_resnet.resnet20(100), path, layout="mdistiller")
