import pytest
import torch

from kdkit.errors import KdkitError
from kdkit.features import FeatureTap, last_linear
from tests.helpers import TinyNet


def test_tap_records_outputs_and_inputs_by_name():
    net = TinyNet(width=5)
    tap = FeatureTap(net, ["conv", "fc:input"])
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        conv = torch.nn.functional.conv2d(x, net.conv.weight, net.conv.bias, padding=1)
        pooled = conv.relu().mean(dim=(2, 3))
        net(x)
    feats = tap.pop()
    assert torch.allclose(feats["conv"], conv, atol=1e-6)
    assert torch.allclose(feats["fc:input"], pooled, atol=1e-6)
    assert tap.pop() == {}  # pop clears


def test_wrong_name_lists_close_valid_names():
    with pytest.raises(KdkitError) as err:
        FeatureTap(TinyNet(), ["cnov"], role="teacher")
    msg = str(err.value)
    assert "'cnov' is not a module of TinyNet" in msg and "conv" in msg and "\n" not in msg


def test_remove_detaches_hooks():
    net = TinyNet()
    tap = FeatureTap(net, ["conv"])
    tap.remove()
    net(torch.rand(1, 1, 8, 8))
    assert tap.pop() == {}


def test_last_linear():
    assert last_linear(TinyNet()) == "fc"
