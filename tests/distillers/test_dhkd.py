import math

import pytest
import torch
from torch import nn

from kdkit.distillers.base import DistillContext
from kdkit.distillers.dhkd import DHKD, binary_kl, binary_kl_norm
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

from .helpers import Pair, assert_gradients, build, distill_backward, from_yaml, image_batch


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def bernoulli_kl(p, q):
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def binary_by_loops(s, t, T, norm):
    """T^2 / B * sum_{i,c} of the per-class Bernoulli KL, with explicit loops."""
    total = 0.0
    for s_row, t_row in zip(s.tolist(), t.tolist()):
        for a, b in zip(s_row, t_row):
            if norm:
                total += bernoulli_kl(0.5, sigmoid((a - b) / T))
            else:
                total += bernoulli_kl(sigmoid(b / T), sigmoid(a / T))
    return T * T * total / len(s)


def test_binary_kl_norm_one_entry_by_hand():
    # d / T = ln 3: sigma = 3/4, KL(1/2 || 3/4) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3); times T^2 = 4.
    s, t = torch.tensor([[2 * math.log(3.0)]]), torch.zeros(1, 1)
    assert binary_kl_norm(s, t, 2.0).item() == pytest.approx(4 * 0.5 * math.log(4 / 3), rel=1e-6)
    assert binary_kl_norm(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-7)


def test_binary_losses_match_loops():
    s = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]])
    t = torch.tensor([[0.0, 1.5, 0.5], [-2.0, 2.0, 1.0]])
    for T in (1.0, 2.0):
        assert binary_kl_norm(s, t, T).item() == pytest.approx(binary_by_loops(s, t, T, True), rel=1e-5)
        assert binary_kl(s, t, T).item() == pytest.approx(binary_by_loops(s, t, T, False), rel=1e-5)
    # BinaryKL-Norm sees only the difference; BinaryKL does not.
    assert binary_kl_norm(s + 3, t + 3, 2.0).item() == pytest.approx(binary_kl_norm(s, t, 2.0).item(), rel=1e-6)
    assert binary_kl(s + 3, t + 3, 2.0).item() != pytest.approx(binary_kl(s, t, 2.0).item(), rel=1e-3)
    # Exact where the reference's clamp of sigma would saturate: grows linearly in |d| / T.
    big = binary_kl_norm(torch.tensor([[100.0]]), torch.zeros(1, 1), 1.0).item()
    assert big == pytest.approx(50.0 - math.log(2.0), rel=1e-6)


def test_linear_aux_head_and_optional_kd_by_hand():
    d = DHKD(head="linear", temperature=2.0, kd_weight=0.5, kd_temperature=1.0)
    h, z_s, z_t = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, -1.0]])
    d.build(Outputs(logits=z_s, embedding=h), Outputs(logits=z_t), DistillContext())
    with torch.no_grad():
        d.aux_head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        d.aux_head.bias.zero_()
    terms = d(Outputs(logits=z_s, embedding=h), Outputs(logits=z_t), {})
    aux = torch.tensor([[1.0, 2.0, 3.0]])  # W h
    assert terms["binary_kl"].item() == pytest.approx(binary_by_loops(aux, z_t, 2.0, True), rel=1e-5)
    # KD on the main head: p_s uniform, p_t = softmax(1, 0, -1).
    z = [math.exp(v) for v in (1.0, 0.0, -1.0)]
    p_t = [v / sum(z) for v in z]
    kl = sum(p * math.log(p * 3) for p in p_t)
    assert terms["kd"].item() == pytest.approx(0.5 * kl, rel=1e-5)


def test_gradients_reach_backbone_and_aux_head_not_main_head():
    d = DHKD()
    pair = Pair(d)
    batch = image_batch()
    build(d, pair, batch)
    terms = distill_backward(d, pair, batch)
    assert set(terms) == {"binary_kl"}
    # The main head ("fc") is left to the task's cross-entropy.
    assert_gradients(pair, d, ["conv1", "layer1", "layer2", "layer3"])


def test_kd_weight_reaches_the_main_head_too():
    d = DHKD(kd_weight=1.0)
    pair = Pair(d)
    batch = image_batch()
    build(d, pair, batch)
    assert set(distill_backward(d, pair, batch)) == {"binary_kl", "kd"}
    assert_gradients(pair, d, ["conv1", "layer1", "layer2", "layer3", "fc"])


def test_yaml_instantiates_and_runs():
    d = from_yaml("dhkd")
    knobs = (d.weight, d.temperature, d.loss, d.head_kind, d.hidden, d.dropout, d.kd_weight)
    assert knobs == (1.0, 2.0, "binary_kl_norm", "nonlinear", 200, 0.1, 0.0)
    pair = Pair(d)
    batch = image_batch()
    build(d, pair, batch)
    assert isinstance(d.aux_head, nn.Sequential) and d.aux_head[0].in_features == 16  # 4 * width 4
    assert d.aux_head[-1].out_features == 5
    terms = d.train()(pair.student_outputs(batch), pair.teacher_outputs(batch), batch)
    assert set(terms) == {"binary_kl"} and torch.isfinite(terms["binary_kl"]) and terms["binary_kl"] > 0


def test_bad_settings_and_shapes():
    with pytest.raises(KdkitError, match="dhkd.loss"):
        DHKD(loss="mse")
    with pytest.raises(KdkitError, match="dhkd.head"):
        DHKD(head="mlp")
    with pytest.raises(KdkitError, match="temperature > 0"):
        DHKD(temperature=0)
    with pytest.raises(KdkitError, match="embedding"):
        DHKD().build(Outputs(logits=torch.zeros(2, 3)), Outputs(logits=torch.zeros(2, 3)), DistillContext())
    with pytest.raises(KdkitError, match=r"\(3,\).*\(4,\)"):
        DHKD(kd_weight=1.0).build(Outputs(logits=torch.zeros(2, 3), embedding=torch.zeros(2, 5)),
                                  Outputs(logits=torch.zeros(2, 4)), DistillContext())
    with pytest.raises(RuntimeError, match="build"):
        DHKD()(Outputs(embedding=torch.zeros(2, 5)), Outputs(logits=torch.zeros(2, 4)), {})
