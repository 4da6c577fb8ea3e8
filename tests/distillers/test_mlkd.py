import math

import numpy as np
import pytest
import torch

from kdkit.distillers.mlkd import MLKD, mlkd_terms
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

from .helpers import Pair, assert_gradients, distill_backward, from_yaml, image_batch
from .test_dkd import softmax


def mlkd_by_hand(s, t, temps):
    """Explicit loops; masks from numpy's median, as the reference's np.percentile(., 50)."""
    s, t = s.tolist(), t.tolist()
    B, C = len(s), len(s[0])
    conf = [max(softmax(row, 1.0)) for row in t]
    m = [1.0 if c <= np.percentile(conf, 50) else 0.0 for c in conf]
    cls = [sum(softmax(row, 1.0)[c] for row in t) for c in range(C)]
    n = [1.0 if v <= np.percentile(cls, 50) else 0.0 for v in cls]
    ins = bat = cla = 0.0
    for T in temps:
        ps = [softmax(row, T) for row in s]
        pt = [softmax(row, T) for row in t]
        for i in range(B):
            ins += m[i] * T * T * sum(b * math.log(b / a) for a, b in zip(ps[i], pt[i])) / B
            for j in range(B):
                gt = sum(pt[i][c] * pt[j][c] for c in range(C))
                gs = sum(ps[i][c] * ps[j][c] for c in range(C))
                bat += m[i] * (gt - gs) ** 2 / B
        for a in range(C):
            for b in range(C):
                mt = sum(pt[i][a] * pt[i][b] for i in range(B))
                ms = sum(ps[i][a] * ps[i][b] for i in range(B))
                cla += n[a] * (mt - ms) ** 2 / C
    return ins, bat, cla


def test_matches_loops_on_4x3():
    torch.manual_seed(0)
    s, t = torch.randn(4, 3) * 2, torch.randn(4, 3) * 2
    got = mlkd_terms(s, t, [2.0, 4.0])
    for value, ref in zip(got, mlkd_by_hand(s, t, [2.0, 4.0])):
        assert value.item() == pytest.approx(ref, rel=1e-5)


def test_masks_keep_low_confidence_samples_and_classes():
    # teacher confidences: sample 0 sure (class 0), samples 1-2 unsure; median keeps 1 and 2 only,
    # so a student that differs only on sample 0 has zero instance loss
    t = torch.tensor([[8.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.2, 0.0]])
    s = t.clone()
    s[0] = torch.tensor([0.0, 8.0, 0.0])
    ins, _, _ = mlkd_terms(s, t, [1.0])
    assert ins.item() == pytest.approx(0.0, abs=1e-7)
    s = t.clone()
    s[1] = torch.tensor([0.0, 8.0, 0.0])  # a kept sample: the loss sees it
    assert mlkd_terms(s, t, [1.0])[0].item() > 0


def test_zero_when_equal():
    t = torch.randn(5, 4)
    terms = MLKD()(Outputs(logits=t.clone()), Outputs(logits=t), {})
    assert set(terms) == {"instance", "batch", "class"}
    assert all(v.item() == pytest.approx(0, abs=1e-6) for v in terms.values())


def test_gradients_reach_the_whole_student_only():
    d = MLKD()
    pair = Pair(d)
    distill_backward(d, pair, image_batch())
    assert_gradients(pair, d, ["conv1", "layer1", "layer2", "layer3", "fc"])


def test_yaml_instantiates_and_runs():
    d = from_yaml("mlkd")
    assert isinstance(d, MLKD) and d.weight == 0.9 and d.temperatures == [2.0, 3.0, 4.0, 5.0, 6.0]
    pair = Pair(d)
    batch = image_batch()
    terms = d(pair.student_outputs(batch), pair.teacher_outputs(batch), batch)
    assert set(terms) == {"instance", "batch", "class"}
    assert all(torch.isfinite(v) and v > 0 for v in terms.values())


def test_bad_settings():
    with pytest.raises(KdkitError, match="temperatures"):
        MLKD(temperatures=[])
    with pytest.raises(KdkitError, match="temperatures"):
        MLKD(temperatures=[4.0, 0.0])
    with pytest.raises(KdkitError, match=r"\(3,\).*\(4,\)"):
        MLKD()(Outputs(logits=torch.zeros(2, 3)), Outputs(logits=torch.zeros(2, 4)), {})
