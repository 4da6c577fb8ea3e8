import math

import pytest
import torch

from kdkit.distillers.dkd import DKD, dkd_terms
from kdkit.distillers.kd import kd_loss
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

from .helpers import Pair, assert_gradients, distill_backward, from_yaml, image_batch


def softmax(row, T):
    z = sum(math.exp(v / T) for v in row)
    return [math.exp(v / T) / z for v in row]


def dkd_by_hand(s, t, labels, T):
    """Per-sample loops over the paper's definitions: binary b = [p_y, 1 - p_y] for TCKD,
    renormalised non-target probabilities p_j / (1 - p_y) for NCKD."""
    tckd = nckd = 0.0
    for s_row, t_row, y in zip(s.tolist(), t.tolist(), labels.tolist()):
        p_s, p_t = softmax(s_row, T), softmax(t_row, T)
        b_s, b_t = [p_s[y], 1 - p_s[y]], [p_t[y], 1 - p_t[y]]
        tckd += sum(bt * math.log(bt / bs) for bs, bt in zip(b_s, b_t))
        for j in range(len(s_row)):
            if j != y:
                q_s, q_t = p_s[j] / (1 - p_s[y]), p_t[j] / (1 - p_t[y])
                nckd += q_t * math.log(q_t / q_s)
    n = len(s)
    return T * T * tckd / n, T * T * nckd / n


def test_matches_loops_on_2x3():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[0.3, 2.5, -1.0], [1.0, 1.0, 2.0]])
    labels = torch.tensor([1, 0])
    tckd, nckd = dkd_terms(s, t, labels, 4.0)
    ref_t, ref_n = dkd_by_hand(s, t, labels, 4.0)
    assert tckd.item() == pytest.approx(ref_t, rel=1e-5)
    assert nckd.item() == pytest.approx(ref_n, rel=1e-5)


def test_recovers_the_kd_decomposition():
    # Zhao et al. Eq. (1) per sample: KD = TCKD + (1 - p^t_target) * NCKD.
    torch.manual_seed(0)
    s, t = torch.randn(1, 6), torch.randn(1, 6)
    y = torch.tensor([2])
    tckd, nckd = dkd_terms(s, t, y, 2.0)
    p_t_target = torch.softmax(t / 2.0, dim=1)[0, 2]
    assert kd_loss(s, t, 2.0).item() == pytest.approx((tckd + (1 - p_t_target) * nckd).item(), rel=1e-5)


def test_zero_when_equal_and_terms_weighted():
    t = torch.randn(4, 5)
    batch = {"label": torch.tensor([0, 1, 4, 2])}
    d = DKD(alpha=1.0, beta=8.0).eval()
    terms = d(Outputs(logits=t.clone()), Outputs(logits=t), batch)
    assert set(terms) == {"tckd", "nckd"}
    assert terms["tckd"].item() == pytest.approx(0, abs=1e-6)
    assert terms["nckd"].item() == pytest.approx(0, abs=1e-6)
    s = torch.randn(4, 5)
    tckd, nckd = dkd_terms(s, t, batch["label"], 4.0)
    terms = DKD(alpha=0.5, beta=3.0).eval()(Outputs(logits=s), Outputs(logits=t), batch)
    assert terms["tckd"].item() == pytest.approx(0.5 * tckd.item(), rel=1e-6)
    assert terms["nckd"].item() == pytest.approx(3.0 * nckd.item(), rel=1e-6)


def test_linear_warmup_counts_training_forwards_and_resumes():
    s, t = Outputs(logits=torch.randn(3, 4)), Outputs(logits=torch.randn(3, 4))
    batch = {"label": torch.tensor([0, 3, 1])}
    d = DKD(warmup_steps=4)
    full = DKD(warmup_steps=0)(s, t, batch)["nckd"].item()
    seen = [d.train()(s, t, batch)["nckd"].item() / full for _ in range(5)]
    assert seen == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    d.eval()(s, t, batch)  # evaluation does not advance the ramp
    assert int(d.step) == 5
    resumed = DKD(warmup_steps=8)
    resumed.load_state_dict(d.state_dict())  # the ramp position is checkpointed
    ratio = resumed.train()(s, t, batch)["tckd"].item() / DKD()(s, t, batch)["tckd"].item()
    assert ratio == pytest.approx(6 / 8)


def test_needs_labels_and_valid_knobs():
    with pytest.raises(KdkitError, match="label"):
        DKD()(Outputs(logits=torch.zeros(2, 3)), Outputs(logits=torch.zeros(2, 3)), {})
    with pytest.raises(KdkitError, match="temperature"):
        DKD(temperature=-1)
    with pytest.raises(KdkitError, match="warmup_steps"):
        DKD(warmup_steps=-1)


def test_gradients_reach_the_whole_student_only():
    d = DKD()
    pair = Pair(d)
    distill_backward(d, pair, image_batch())
    assert_gradients(pair, d, ["conv1", "layer1", "layer2", "layer3", "fc"])


def test_yaml_instantiates_and_runs():
    d = from_yaml("dkd")
    assert (d.alpha, d.beta, d.temperature) == (1.0, 8.0, 4.0) and d.warmup_steps > 0
    pair = Pair(d)
    batch = image_batch()
    terms = d.train()(pair.student_outputs(batch), pair.teacher_outputs(batch), batch)
    assert set(terms) == {"tckd", "nckd"} and all(torch.isfinite(v) and v > 0 for v in terms.values())
