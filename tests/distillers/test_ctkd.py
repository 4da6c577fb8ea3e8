import math

import pytest
import torch

from kdkit.distillers.ctkd import CTKD
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

from .helpers import Pair, assert_gradients, distill_backward, from_yaml, image_batch
from .test_kd import kd_by_hand


S = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
T_ = torch.tensor([[0.3, 2.5, -1.0], [1.0, 1.0, 2.0]])


def test_value_at_the_initial_temperature():
    d = CTKD()
    tau = 1 + 20 / (1 + math.exp(-1.0))  # theta starts at 1
    got = d(Outputs(logits=S), Outputs(logits=T_), {})["loss"].item()
    assert got == pytest.approx(kd_by_hand(S, T_, tau), rel=1e-5)


def test_cosine_curriculum_of_lambda():
    d = CTKD(lambda_min=0.0, lambda_max=1.0, curriculum_epochs=10)
    # the reference's CosineDecay(max=0, min=-1, loops=10).get_value(i) is -lambda at i = epoch + 1
    for epoch in (0, 4, 9, 30):
        i = min(epoch + 1, 10)
        ref = -((math.cos(i * math.pi / 10) + 1) / 2 * (0 - (-1)) + (-1))
        assert d.reversal_strength(epoch) == pytest.approx(ref)
    assert d.reversal_strength(9) == pytest.approx(1.0) and d.reversal_strength(50) == pytest.approx(1.0)


def test_temperature_gradient_is_reversed_and_scaled_by_lambda():
    s = S.clone().requires_grad_(True)
    d = CTKD()
    d.set_progress(4, 0)
    lam = d.reversal_strength(4)
    d(Outputs(logits=s), Outputs(logits=T_), {})["loss"].backward()
    # the same loss as a plain function of theta, without the reversal
    theta = torch.tensor(1.0, requires_grad=True)
    tau = 1 + 20 * torch.sigmoid(theta)
    p_t = torch.softmax(T_ / tau, 1)
    plain = tau**2 * (p_t * (torch.log_softmax(T_ / tau, 1) - torch.log_softmax(S / tau, 1))).sum(1).mean()
    plain.backward()
    assert d.temperature.theta.grad.item() == pytest.approx(-lam * theta.grad.item(), rel=1e-4)
    assert s.grad is not None and s.grad.abs().sum() > 0  # the student is not reversed


def test_gradients_reach_the_student_and_the_temperature_only():
    d = CTKD()
    d.set_progress(3, 100)
    pair = Pair(d)
    distill_backward(d, pair, image_batch())
    assert_gradients(pair, d, ["conv1", "layer1", "layer2", "layer3", "fc"])


def test_yaml_instantiates_and_runs():
    d = from_yaml("ctkd")
    assert isinstance(d, CTKD) and d.weight == 0.9 and d.curriculum_epochs == 10
    assert (d.temperature.t_start, d.temperature.t_range) == (1.0, 20.0)
    pair = Pair(d)
    batch = image_batch()
    terms = d(pair.student_outputs(batch), pair.teacher_outputs(batch), batch)
    assert set(terms) == {"loss"} and torch.isfinite(terms["loss"]) and terms["loss"] > 0
    assert "temperature.theta" in dict(d.named_parameters())  # trained and checkpointed with it


def test_bad_settings():
    with pytest.raises(KdkitError, match="t_start"):
        CTKD(t_start=0)
    with pytest.raises(KdkitError, match="t_range"):
        CTKD(t_range=-1)
    with pytest.raises(KdkitError, match="curriculum_epochs"):
        CTKD(curriculum_epochs=0)
    with pytest.raises(KdkitError, match=r"\(3,\).*\(4,\)"):
        CTKD()(Outputs(logits=torch.zeros(2, 3)), Outputs(logits=torch.zeros(2, 4)), {})
