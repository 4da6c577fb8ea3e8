import math

import pytest
import torch

from kdkit.distillers.logit_std import LogitStd, standardize
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

from .helpers import Pair, assert_gradients, distill_backward, from_yaml, image_batch
from .test_dkd import dkd_by_hand
from .test_kd import kd_by_hand


def zscore(row, eps=1e-7):
    n = len(row)
    mean = sum(row) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (n - 1))
    return [(v - mean) / (eps + std) for v in row]


def zscored(x):
    return torch.tensor([zscore(row) for row in x.tolist()])


def ls_kd_by_hand(s, t, T):
    return kd_by_hand(zscored(s), zscored(t), T)


def ls_dkd_by_hand(s, t, labels, T):
    return dkd_by_hand(zscored(s), zscored(t), labels, T)


S = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 3.0, 2.0]])
T_ = torch.tensor([[0.3, 2.5, -1.0, 4.0], [1.0, 1.0, 2.0, -3.0]])


def test_standardize_by_hand():
    z = standardize(torch.tensor([[1.0, 2.0, 3.0]]), eps=0.0)
    assert z.tolist()[0] == pytest.approx([-1.0, 0.0, 1.0])  # mean 2, unbiased std 1


def test_kd_mode_matches_loops():
    d = LogitStd(temperature=2.0)
    got = d(Outputs(logits=S), Outputs(logits=T_), {})["loss"].item()
    assert got == pytest.approx(ls_kd_by_hand(S, T_, 2.0), rel=1e-5)


def test_invariant_to_logit_scale_and_shift():
    # the point of the method: a student whose logits are an affine copy of the teacher's has loss 0
    d = LogitStd(temperature=2.0)
    t = torch.randn(3, 6)
    assert d(Outputs(logits=3.0 * t + 1.5), Outputs(logits=t), {})["loss"].item() == pytest.approx(0, abs=1e-6)


def test_dkd_mode_matches_loops_and_weights():
    labels = torch.tensor([3, 0])
    d = LogitStd(temperature=2.0, mode="dkd", alpha=0.5, beta=3.0)
    terms = d(Outputs(logits=S), Outputs(logits=T_), {"label": labels})
    ref_t, ref_n = ls_dkd_by_hand(S, T_, labels, 2.0)
    assert set(terms) == {"tckd", "nckd"}
    assert terms["tckd"].item() == pytest.approx(0.5 * ref_t, rel=1e-5)
    assert terms["nckd"].item() == pytest.approx(3.0 * ref_n, rel=1e-5)


def test_gradients_reach_the_whole_student_only():
    for mode in ("kd", "dkd"):
        d = LogitStd(mode=mode)
        pair = Pair(d)
        distill_backward(d, pair, image_batch())
        assert_gradients(pair, d, ["conv1", "layer1", "layer2", "layer3", "fc"])


def test_yaml_instantiates_and_runs():
    d = from_yaml("logit_std")
    assert isinstance(d, LogitStd) and (d.weight, d.temperature, d.mode) == (9.0, 2.0, "kd")
    pair = Pair(d)
    batch = image_batch()
    terms = d(pair.student_outputs(batch), pair.teacher_outputs(batch), batch)
    assert set(terms) == {"loss"} and torch.isfinite(terms["loss"]) and terms["loss"] > 0


def test_bad_settings():
    with pytest.raises(KdkitError, match="temperature"):
        LogitStd(temperature=0)
    with pytest.raises(KdkitError, match="mode"):
        LogitStd(mode="dist")
    with pytest.raises(KdkitError, match="label"):
        LogitStd(mode="dkd")(Outputs(logits=S), Outputs(logits=T_), {})
    with pytest.raises(KdkitError, match="2 classes"):
        LogitStd()(Outputs(logits=torch.zeros(2, 1)), Outputs(logits=torch.zeros(2, 1)), {})
    with pytest.raises(KdkitError, match=r"\(4,\).*\(5,\)"):
        LogitStd()(Outputs(logits=torch.zeros(2, 4)), Outputs(logits=torch.zeros(2, 5)), {})
