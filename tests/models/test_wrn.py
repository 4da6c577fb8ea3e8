"""Wide ResNets: exact RepDistiller parameter counts, the pre-activation block, stage taps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdkit.features import FeatureTap
from kdkit.models import wrn

ARCHS = {"wrn_16_1": (16, 1), "wrn_16_2": (16, 2), "wrn_40_1": (40, 1), "wrn_40_2": (40, 2)}


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def expected_params(depth: int, k: int, num_classes: int) -> int:
    """Zagoruyko & Komodakis' WRN counted layer by layer: per block BN(in) + 3x3 conv + BN(out)
    + 3x3 conv, a 1x1 shortcut conv where the width or stride changes; final BN and linear."""
    n = (depth - 4) // 6
    total = 3 * 16 * 9  # stem conv
    c_in = 16
    for stage, c in enumerate((16 * k, 32 * k, 64 * k)):
        for block in range(n):
            total += 2 * c_in + c_in * c * 9 + 2 * c + c * c * 9
            if c_in != c or (block == 0 and stage > 0):
                total += c_in * c
            c_in = c
    return total + 2 * c_in + c_in * num_classes + num_classes


@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("num_classes", [10, 100])
def test_parameter_count_matches_layer_by_layer_formula(name, num_classes):
    assert count(getattr(wrn, name)(num_classes=num_classes)) == expected_params(*ARCHS[name], num_classes)


@pytest.mark.parametrize("name, millions", [("wrn_16_2", 0.70), ("wrn_40_1", 0.57), ("wrn_40_2", 2.26)])
def test_parameter_count_matches_published_cifar100(name, millions):
    # WRN-40-2 has 2,255,156 parameters with 100 classes; papers quote it as 2.25M or 2.26M.
    assert round(count(getattr(wrn, name)(num_classes=100)) / 1e6, 2) == millions


@pytest.mark.parametrize("name", list(ARCHS))
def test_forward_shape_and_stage_taps(name):
    depth, k = ARCHS[name]
    model = getattr(wrn, name)(num_classes=5).eval()
    assert [len(model.block1), len(model.block2), len(model.block3)] == [(depth - 4) // 6] * 3
    tap = FeatureTap(model, ["conv1", "block1", "block2", "block3", "relu", "fc:input"])
    logits = model(torch.randn(2, 3, 32, 32))
    f = tap.pop()
    assert logits.shape == (2, 5)
    assert f["conv1"].shape == (2, 16, 32, 32)
    assert f["block1"].shape == (2, 16 * k, 32, 32)
    assert f["block2"].shape == (2, 32 * k, 16, 16)
    assert f["block3"].shape == (2, 64 * k, 8, 8)
    torch.testing.assert_close(f["relu"], torch.relu(model.bn1(f["block3"])))
    torch.testing.assert_close(f["fc:input"], f["relu"].mean(dim=(2, 3)))


def _randomise_bn(module):
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


def _bn(m, t):
    return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias)


def test_widening_block_shortcut_reads_the_activated_input():
    """RepDistiller: when the width changes, x <- relu(bn1(x)) feeds both conv1 and the 1x1 conv."""
    block = wrn.WideBasicBlock(4, 8, stride=2).eval()
    _randomise_bn(block)
    x = torch.randn(2, 4, 8, 8)
    act = torch.relu(_bn(block.bn1, x))
    out = F.conv2d(act, block.conv1.weight, stride=2, padding=1)
    out = F.conv2d(torch.relu(_bn(block.bn2, out)), block.conv2.weight, padding=1)
    torch.testing.assert_close(block(x), out + F.conv2d(act, block.shortcut.weight, stride=2))


def test_identity_block_shortcut_is_the_raw_input():
    block = wrn.WideBasicBlock(8, 8).eval()
    _randomise_bn(block)
    assert block.shortcut is None
    x = torch.randn(2, 8, 6, 6)
    out = F.conv2d(torch.relu(_bn(block.bn1, x)), block.conv1.weight, padding=1)
    out = F.conv2d(torch.relu(_bn(block.bn2, out)), block.conv2.weight, padding=1)
    torch.testing.assert_close(block(x), out + x)


def test_dropout_only_in_training():
    model = wrn.wrn_16_1(drop_rate=0.5)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, model(x))


def test_bad_depth_is_refused():
    with pytest.raises(ValueError, match="6n\\+4"):
        wrn.WideResNet(20, 2)
