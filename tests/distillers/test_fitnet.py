import pytest
import torch
from torch import nn

from kdkit.distillers.adapters import ConvAdapter, LinearAdapter, make_adapter
from kdkit.distillers.base import DistillContext
from kdkit.distillers.fitnet import FitNet
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

from .helpers import Pair, assert_gradients, build, distill_backward, from_yaml, image_batch, run_once


def feats(s: torch.Tensor, t: torch.Tensor, name: str = "f") -> tuple[Outputs, Outputs]:
    return Outputs(features={name: s}), Outputs(features={name: t})


def test_mse_without_adapter_by_hand():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0, 3.0], [1.0, 0.0, -1.0]])
    # squared errors: 0, 4, 0, 1, 0, 4 -> mean 9 / 6
    d = FitNet(student_feature="f", teacher_feature="f", adapter=False)
    student, teacher = feats(s, t)
    d.build(student, teacher, DistillContext())
    assert d(student, teacher, {})["loss"].item() == pytest.approx(1.5)
    assert d(*feats(t.clone(), t), {})["loss"].item() == 0.0


def test_linear_adapter_by_hand():
    d = FitNet(student_feature="f", teacher_feature="f", adapter=True)
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 1.0]])
    t = torch.tensor([[1.0, 5.0], [0.0, 0.0]])
    d.build(*feats(s, t), DistillContext())
    assert isinstance(d.adapter, LinearAdapter)
    with torch.no_grad():
        d.adapter.linear.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]))
        d.adapter.linear.bias.copy_(torch.tensor([0.0, 1.0]))
    # r(s) = [[1, 6], [0, 3]]; errors 0, 1, 0, 9 -> mean 2.5
    assert d(*feats(s, t), {})["loss"].item() == pytest.approx(2.5)


def test_conv_adapter_pools_a_larger_student_map():
    a = ConvAdapter(1, 1, (2, 2)).eval()  # eval BN: running mean 0, var 1
    with torch.no_grad():
        a.conv.weight.fill_(1.0)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    y = a(x)
    for i in range(2):
        for j in range(2):
            block = x[0, 0, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean().item()
            assert y[0, 0, i, j].item() == pytest.approx(block / (1 + a.bn.eps) ** 0.5, rel=1e-6)


def test_conv_adapter_upsamples_a_smaller_student_map():
    a = ConvAdapter(3, 5, (4, 4)).eval()
    x = torch.full((2, 3, 2, 2), 0.7)  # a constant map stays constant under bilinear resizing
    y = a(x)
    assert y.shape == (2, 5, 4, 4)
    assert torch.allclose(y, y[:, :, :1, :1].expand_as(y))


def test_shape_mismatch_without_adapter_names_both_shapes():
    d = FitNet(student_feature="layer1", teacher_feature="layer1", adapter=False)
    pair = Pair(d, s_width=4, t_width=6)
    with pytest.raises(KdkitError, match=r"\(4, 8, 8\).*\(6, 8, 8\)") as err:
        build(d, pair, image_batch())
    assert "adapter" in str(err.value)


def test_no_adapter_fits_a_map_to_a_vector():
    with pytest.raises(KdkitError, match=r"\(4, 8, 8\).*\(6,\)"):
        make_adapter((2, 4, 8, 8), (2, 6), "fitnet")


def test_gradients_reach_student_up_to_the_guided_layer_and_the_adapter():
    d = FitNet(student_feature="layer2", teacher_feature="layer3", adapter=True)
    pair = Pair(d)
    batch = image_batch()
    build(d, pair, batch)
    assert isinstance(d.adapter, ConvAdapter) and d.adapter.size == (2, 2)  # 4x4 student -> 2x2
    assert any(k.startswith("adapter.") for k in d.state_dict())  # saved with the student
    distill_backward(d, pair, batch)
    assert_gradients(pair, d, ["conv1", "layer1", "layer2"])


def test_yaml_instantiates_and_runs():
    d = from_yaml("fitnet")
    knobs = (d.student_feature, d.teacher_feature, d.use_adapter, d.weight)
    assert knobs == ("layer2", "layer2", True, 100.0)
    loss = run_once(d)["loss"]
    assert torch.isfinite(loss) and loss > 0
    assert isinstance(d.adapter.conv, nn.Conv2d) and d.adapter.conv.in_channels == 8
