"""CIFAR ResNets: exact RepDistiller parameter counts, published sizes, shapes, tap names."""

from __future__ import annotations

import pytest
import torch

from kdkit.features import FeatureTap
from kdkit.models import cifar_resnet

SMALL, X4 = (16, 16, 32, 64), (32, 64, 128, 256)
ARCHS = {  # name -> (depth, widths), as listed in RepDistiller models/resnet.py
    "resnet8": (8, SMALL), "resnet14": (14, SMALL), "resnet20": (20, SMALL),
    "resnet32": (32, SMALL), "resnet44": (44, SMALL), "resnet56": (56, SMALL),
    "resnet110": (110, SMALL), "resnet8x4": (8, X4), "resnet32x4": (32, X4),
}


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def expected_params(depth: int, widths, num_classes: int) -> int:
    """Parameters of He et al.'s CIFAR ResNet counted layer by layer (convs without bias, BN
    weight + bias, 1x1 projection + BN wherever a block changes shape, linear classifier)."""
    n = (depth - 2) // 6
    total = 3 * 9 * widths[0] + 2 * widths[0]  # stem conv + bn
    c_in = widths[0]
    for stage, c in enumerate(widths[1:]):
        for block in range(n):
            total += c_in * c * 9 + 2 * c + c * c * 9 + 2 * c
            if c_in != c or (block == 0 and stage > 0):
                total += c_in * c + 2 * c
            c_in = c
    return total + c_in * num_classes + num_classes


@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("num_classes", [10, 100])
def test_parameter_count_matches_layer_by_layer_formula(name, num_classes):
    depth, widths = ARCHS[name]
    model = getattr(cifar_resnet, name)(num_classes=num_classes)
    assert count(model) == expected_params(depth, widths, num_classes)


@pytest.mark.parametrize("name, num_classes, millions", [
    # CIFAR-10. He et al.'s Table 6 (0.27M, 0.46M, 0.85M) counts option-A (parameter-free)
    # shortcuts; RepDistiller's 1x1 projections add 2,752 parameters, visible from resnet32 on.
    ("resnet20", 10, 0.27),
    # CIFAR-100 heads: the sizes the KD literature quotes for the RepDistiller models
    ("resnet20", 100, 0.28), ("resnet56", 100, 0.86), ("resnet8x4", 100, 1.23),
    ("resnet32x4", 100, 7.43),
])
def test_parameter_count_matches_published(name, num_classes, millions):
    assert round(count(getattr(cifar_resnet, name)(num_classes=num_classes)) / 1e6, 2) == millions


def test_exact_counts_of_the_usual_pairs():
    assert count(cifar_resnet.resnet20(num_classes=10)) == 272_474
    assert count(cifar_resnet.resnet56(num_classes=100)) == 861_620
    assert count(cifar_resnet.resnet8x4(num_classes=100)) == 1_233_540
    assert count(cifar_resnet.resnet32x4(num_classes=100)) == 7_433_860


@pytest.mark.parametrize("name", list(ARCHS))
def test_forward_shape_and_stage_taps(name):
    depth, widths = ARCHS[name]
    model = getattr(cifar_resnet, name)(num_classes=7).eval()
    n = (depth - 2) // 6
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [n, n, n]
    tap = FeatureTap(model, ["conv1", "bn1", "layer1", "layer2", "layer3", "fc:input"])
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    feats = tap.pop()
    assert logits.shape == (2, 7)
    assert feats["conv1"].shape == feats["bn1"].shape == (2, widths[0], 32, 32)
    assert feats["layer1"].shape == (2, widths[1], 32, 32)
    assert feats["layer2"].shape == (2, widths[2], 16, 16)
    assert feats["layer3"].shape == (2, widths[3], 8, 8)
    # The classifier reads the global average of the last stage, and nothing else.
    torch.testing.assert_close(feats["fc:input"], feats["layer3"].mean(dim=(2, 3)))
    torch.testing.assert_close(logits, feats["fc:input"] @ model.fc.weight.T + model.fc.bias)


def test_preactivation_tap_is_the_stage_output_before_relu():
    model = cifar_resnet.resnet20().eval()
    tap = FeatureTap(model, ["layer2.2.relu2:input", "layer2"])
    model(torch.randn(2, 3, 32, 32))
    feats = tap.pop()
    pre = feats["layer2.2.relu2:input"]
    assert (pre < 0).any()  # a real pre-activation, not clobbered by an in-place ReLU
    torch.testing.assert_close(torch.relu(pre), feats["layer2"])


def test_block_computes_post_activation_residual():
    """Re-derive one downsampling block with functional ops (He et al. eq. 2, option B)."""
    block = cifar_resnet.BasicBlock(4, 8, stride=2).eval()
    for bn in (block.bn1, block.bn2, block.downsample[1]):  # non-trivial BN statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 4, 8, 8)

    def bn(m, t):
        return torch.nn.functional.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias)

    conv = torch.nn.functional.conv2d
    h = torch.relu(bn(block.bn1, conv(x, block.conv1.weight, stride=2, padding=1)))
    h = bn(block.bn2, conv(h, block.conv2.weight, padding=1))
    shortcut = bn(block.downsample[1], conv(x, block.downsample[0].weight, stride=2))
    torch.testing.assert_close(block(x), torch.relu(h + shortcut))


def test_other_resolutions_and_channels():
    model = cifar_resnet.resnet8(num_classes=3, in_channels=1)
    assert model(torch.randn(2, 1, 40, 40)).shape == (2, 3)


def test_bad_depth_is_refused():
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar_resnet.CifarResNet(21, SMALL)
