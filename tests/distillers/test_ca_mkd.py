import math

import pytest
import torch

from kdkit.distillers.ca_mkd import CAMKD, ca_mkd_loss, confidence_weights
from kdkit.distillers.kd import kd_loss
from kdkit.errors import KdkitError

from .helpers import from_yaml, image_batch
from .multi import assert_only_student_and_distillers_learn, backward, multi_task


def ce(logits, label):
    return -math.log(math.exp(logits[label]) / sum(math.exp(v) for v in logits))


def test_weights_by_hand_for_two_teachers():
    # K = 2: w_1 = 1 - e^{ce_1} / (e^{ce_1} + e^{ce_2}) = e^{ce_2} / (e^{ce_1} + e^{ce_2})
    t1 = torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    t2 = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    labels = torch.tensor([0, 2])
    w = confidence_weights([t1, t2], labels)
    for i in range(2):
        c1, c2 = ce(t1[i].tolist(), int(labels[i])), ce(t2[i].tolist(), int(labels[i]))
        assert w[0, i].item() == pytest.approx(math.exp(c2) / (math.exp(c1) + math.exp(c2)), rel=1e-5)
    assert torch.allclose(w.sum(0), torch.ones(2))
    assert w[0, 0] > 0.5 > w[0, 1]  # teacher 1 is right on sample 0, teacher 2 on sample 1


def test_three_teachers_sum_to_one_and_unlabelled_samples_are_equal():
    ts = [torch.randn(4, 5) for _ in range(3)]
    w = confidence_weights(ts, torch.tensor([0, 1, 2, 3]), labelled=torch.tensor([True, False, True, False]))
    assert torch.allclose(w.sum(0), torch.ones(4), atol=1e-6)
    assert torch.allclose(w[:, 1], torch.full((3,), 1 / 3)) and torch.allclose(w[:, 3], torch.full((3,), 1 / 3))


def test_loss_is_the_weighted_sum_of_per_sample_kd():
    s, t1, t2 = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    w = torch.tensor([[0.2, 0.5, 0.9], [0.8, 0.5, 0.1]])
    T = 2.0
    expected = sum(w[k, i].item() * kd_loss(s[i:i + 1], t[i:i + 1], T).item()
                   for k, t in enumerate((t1, t2)) for i in range(3)) / 3
    assert ca_mkd_loss(s, [t1, t2], w, T).item() == pytest.approx(expected, rel=1e-5)


def test_in_a_task_and_errors():
    task = multi_task({"ca": CAMKD(temperature=2.0)})
    batch = image_batch(seed=2)
    losses = backward(task, batch)
    assert torch.isfinite(losses["ca"])
    assert_only_student_and_distillers_learn(task)
    with pytest.raises(KdkitError, match="at least 2 teachers"):
        multi_task({"ca": CAMKD()}, widths=(6,))
    with pytest.raises(KdkitError, match="label_key"):
        CAMKD(label_key="y")(task.student_outputs(batch), {"t0": task.teacher_outputs(batch, "t0"),
                                                           "t1": task.teacher_outputs(batch, "t1")}, batch)


def test_yaml_instantiates():
    d = from_yaml("ca_mkd")
    assert isinstance(d, CAMKD) and d.label_key == "label" and d.mask_key is None
