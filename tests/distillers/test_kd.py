import math

import pytest
import torch

from kdkit.distillers.kd import KD, kd_loss
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

from .helpers import Pair, assert_gradients, distill_backward, from_yaml, image_batch


def kd_by_hand(s, t, T):
    """T^2 * mean_i sum_j p_t log(p_t / p_s) with explicit loops."""
    total = 0.0
    for s_row, t_row in zip(s.tolist(), t.tolist()):
        zs = sum(math.exp(v / T) for v in s_row)
        zt = sum(math.exp(v / T) for v in t_row)
        for a, b in zip(s_row, t_row):
            p_s, p_t = math.exp(a / T) / zs, math.exp(b / T) / zt
            total += p_t * math.log(p_t / p_s)
    return T * T * total / len(s)


def test_two_class_value_by_hand():
    # p_t = (3/4, 1/4), p_s = (1/2, 1/2): KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.1308120; times T^2 = 4.
    s = torch.zeros(1, 2)
    t = torch.tensor([[2 * math.log(3.0), 0.0]])
    assert kd_loss(s, t, 2.0).item() == pytest.approx(4 * 0.1308120, abs=1e-6)


def test_matches_loops_on_2x3():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[0.3, 2.5, -1.0], [1.0, 1.0, 2.0]])
    for T in (1.0, 4.0):
        assert kd_loss(s, t, T).item() == pytest.approx(kd_by_hand(s, t, T), rel=1e-5)


def test_zero_when_equal_and_shift_invariant():
    t = torch.randn(4, 7)
    d = KD(temperature=3.0)
    assert d(Outputs(logits=t.clone()), Outputs(logits=t), {})["loss"].item() == pytest.approx(0, abs=1e-6)
    # softmax ignores a per-row constant, so shifted student logits give the same loss
    s = torch.randn(4, 7)
    assert kd_loss(s + 5.0, t, 3.0).item() == pytest.approx(kd_loss(s, t, 3.0).item(), rel=1e-5)


def test_bf16_student_is_computed_in_float32():
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    s16 = s.bfloat16()
    loss = kd_loss(s16, t, 4.0)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(kd_by_hand(s16.float(), t, 4.0), rel=1e-5)


def test_gradients_reach_the_whole_student_only():
    d = KD(temperature=4.0)
    pair = Pair(d)
    distill_backward(d, pair, image_batch())
    assert_gradients(pair, d, ["conv1", "layer1", "layer2", "layer3", "fc"])


def test_yaml_instantiates_and_runs():
    d = from_yaml("kd")
    assert isinstance(d, KD) and d.temperature == 4.0 and d.weight == 1.0
    pair = Pair(d)
    batch = image_batch()
    terms = d(pair.student_outputs(batch), pair.teacher_outputs(batch), batch)
    assert set(terms) == {"loss"} and torch.isfinite(terms["loss"]) and terms["loss"] > 0


def test_bad_temperature_and_class_mismatch():
    with pytest.raises(KdkitError, match="temperature"):
        KD(temperature=0)
    with pytest.raises(KdkitError, match=r"\(5,\).*\(7,\)"):
        KD()(Outputs(logits=torch.zeros(2, 5)), Outputs(logits=torch.zeros(2, 7)), {})
