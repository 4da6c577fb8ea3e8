import math

import pytest
import torch
import torch.nn.functional as F

from kdkit.distillers.pld import PLD, pld_loss, teacher_optimal_order
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

from .helpers import Pair, assert_gradients, distill_backward, from_yaml, image_batch


def pld_by_hand(s, t, labels, tau=1.0):
    """Explicit ranking and Plackett-Luce choice probabilities, one rank at a time."""
    total = 0.0
    for s_row, t_row, y in zip(s.tolist(), t.tolist(), labels.tolist()):
        rest = sorted((c for c in range(len(s_row)) if c != y), key=lambda c: -t_row[c])
        order = [y, *rest]
        zt = sum(math.exp(v / tau) for v in t_row)
        for k, c in enumerate(order):
            remaining = sum(math.exp(s_row[d]) for d in order[k:])
            choice_prob = math.exp(s_row[c]) / remaining
            total += math.exp(t_row[c] / tau) / zt * -math.log(choice_prob)
    return total / len(s)


S = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 3.0, 2.0]])
T_ = torch.tensor([[0.3, 2.5, -1.0, 4.0], [1.0, 1.0, 2.0, -3.0]])
Y = torch.tensor([0, 2])


def test_order_puts_the_label_first_then_the_teacher_ranking():
    assert teacher_optimal_order(T_, Y).tolist() == [[0, 3, 1, 2], [2, 0, 1, 3]]


def test_matches_loops():
    for tau in (1.0, 2.0):
        assert pld_loss(S, T_, Y, tau).item() == pytest.approx(pld_by_hand(S, T_, Y, tau), rel=1e-5)


def test_two_classes_reduce_to_weighted_cross_entropy():
    # with C = 2 only the first rank contributes: p^t_y * CE(s, y)
    s, t, y = torch.tensor([[0.7, -0.2]]), torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    expected = torch.softmax(t, 1)[0, 1] * F.cross_entropy(s, y)
    assert pld_loss(s, t, y).item() == pytest.approx(expected.item(), rel=1e-6)


def test_shift_invariant_and_zero_gradient_through_the_teacher_order():
    assert pld_loss(S + 7.0, T_, Y).item() == pytest.approx(pld_loss(S, T_, Y).item(), rel=1e-5)
    s, t = S.clone().requires_grad_(True), T_.clone().requires_grad_(True)
    pld_loss(s, t, Y).backward()
    assert t.grad is None or t.grad.abs().sum() == 0  # ranks and weights are constants


def test_gradients_reach_the_whole_student_only():
    d = PLD()
    pair = Pair(d)
    distill_backward(d, pair, image_batch())
    assert_gradients(pair, d, ["conv1", "layer1", "layer2", "layer3", "fc"])


def test_yaml_instantiates_and_runs():
    d = from_yaml("pld")
    assert isinstance(d, PLD) and d.weight == 1.0 and d.teacher_temperature == 1.0
    pair = Pair(d)
    batch = image_batch()
    terms = d(pair.student_outputs(batch), pair.teacher_outputs(batch), batch)
    assert set(terms) == {"loss"} and torch.isfinite(terms["loss"]) and terms["loss"] > 0


def test_bad_settings():
    with pytest.raises(KdkitError, match="teacher_temperature"):
        PLD(teacher_temperature=0)
    with pytest.raises(KdkitError, match="label"):
        PLD()(Outputs(logits=S), Outputs(logits=T_), {})
    with pytest.raises(KdkitError, match=r"\(4,\).*\(5,\)"):
        PLD()(Outputs(logits=torch.zeros(2, 4)), Outputs(logits=torch.zeros(2, 5)), {"label": Y})
