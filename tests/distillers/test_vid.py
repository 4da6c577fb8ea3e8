import math

import pytest
import torch

from kdkit.distillers.base import DistillContext
from kdkit.distillers.vid import VID, softplus_inverse
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

from .helpers import Pair, assert_gradients, build, distill_backward, from_yaml, image_batch, run_once


def built_vid(s, t, **kwargs) -> tuple[VID, Outputs, Outputs]:
    d = VID(pairs=[["a", "b"]], **kwargs)
    student, teacher = Outputs(features={"a": s}), Outputs(features={"b": t})
    d.build(student, teacher, DistillContext())
    return d, student, teacher


def test_softplus_inverse_round_trips():
    for y in (1e-3, 0.5, 5.0, 30.0):
        assert math.log1p(math.exp(softplus_inverse(y))) == pytest.approx(y, rel=1e-9)


def test_nll_by_loops_with_identity_regressor():
    torch.manual_seed(0)
    s, t = torch.randn(2, 2, 2, 2), torch.randn(2, 2, 2, 2)
    d, student, teacher = built_vid(s, t, init_pred_var=2.0, eps=1e-5)
    with torch.no_grad():  # mu(s) = relu(relu(s)) = relu(s): identity convolutions
        for conv in (d.regressors[0][0], d.regressors[0][2], d.regressors[0][4]):
            conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        d.log_scales[0].copy_(torch.tensor([softplus_inverse(0.5), softplus_inverse(3.0)]))
    var = [0.5 + 1e-5, 3.0 + 1e-5]
    expected, n = 0.0, 0
    for b in range(2):
        for c in range(2):
            for h in range(2):
                for w in range(2):
                    mu = max(s[b, c, h, w].item(), 0.0)
                    x = t[b, c, h, w].item()
                    expected += 0.5 * math.log(var[c]) + (x - mu) ** 2 / (2 * var[c])
                    n += 1
    loss = d(student, teacher, {})["loss"]
    assert loss.item() == pytest.approx(expected / n, rel=1e-5)


def test_initial_variance_and_pooling_of_the_larger_map():
    torch.manual_seed(1)
    s, t = torch.randn(3, 4, 4, 4), torch.randn(3, 5, 2, 2)  # student 4x4 pooled to 2x2
    d, student, teacher = built_vid(s, t, init_pred_var=5.0, eps=1e-5)
    assert torch.allclose(d.variances()[0], torch.full((5,), 5.0), atol=1e-5)
    with torch.no_grad():
        mu = d.regressors[0](torch.nn.functional.avg_pool2d(s, 2))
    expected = 0.5 * math.log(5.0) + ((t - mu) ** 2).mean().item() / (2 * 5.0)
    assert d(student, teacher, {})["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_pairs_are_summed():
    torch.manual_seed(2)
    s, t = torch.randn(2, 3, 2, 2), torch.randn(2, 4, 2, 2)
    one, student, teacher = built_vid(s, t)
    two = VID(pairs=[["a", "b"], ["a", "b"]])
    two.build(student, teacher, DistillContext())
    two.regressors[1].load_state_dict(two.regressors[0].state_dict())
    single = VID(pairs=[["a", "b"]])
    single.build(student, teacher, DistillContext())
    single.regressors[0].load_state_dict(two.regressors[0].state_dict())
    assert two(student, teacher, {})["loss"].item() == pytest.approx(
        2 * single(student, teacher, {})["loss"].item(), rel=1e-6)


def test_bad_settings_and_shapes_are_refused():
    with pytest.raises(KdkitError, match="init_pred_var"):
        VID(init_pred_var=0.0)
    with pytest.raises(KdkitError, match="pairs"):
        VID(pairs=["layer1"])
    with pytest.raises(KdkitError, match=r"vid: pair \[a, b\] needs maps.*\(3,\)"):
        built_vid(torch.zeros(2, 3), torch.zeros(2, 4, 2, 2))


def test_gradients_reach_student_regressors_and_variances_only():
    d = VID(pairs=[["layer1", "layer1"], ["layer2", "layer3"]])
    pair = Pair(d)
    batch = image_batch()
    build(d, pair, batch)
    assert len(d.regressors) == 2 and d.log_scales[1].shape == (24,)  # teacher layer3: 4 * 6
    assert any(k.startswith("regressors.") for k in d.state_dict())
    distill_backward(d, pair, batch)
    assert_gradients(pair, d, ["conv1", "layer1", "layer2"])


def test_yaml_instantiates_and_runs():
    d = from_yaml("vid")
    assert (d.pairs, d.init_pred_var, d.eps, d.weight) == (
        [("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3")], 5.0, 1e-5, 1.0)
    loss = run_once(d)["loss"]
    assert torch.isfinite(loss)
