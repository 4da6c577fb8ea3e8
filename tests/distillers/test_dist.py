import numpy as np
import pytest
import torch

from kdkit.distillers.dist import DIST, dist_terms
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

from .helpers import Pair, assert_gradients, distill_backward, from_yaml, image_batch


def dist_by_numpy(s, t, tau):
    """numpy's corrcoef per row (samples) and per column (classes)."""
    def softmax(z):
        e = np.exp(z / tau - (z / tau).max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    y_s, y_t = softmax(s.double().numpy()), softmax(t.double().numpy())
    inter = 1 - np.mean([np.corrcoef(y_s[i], y_t[i])[0, 1] for i in range(y_s.shape[0])])
    intra = 1 - np.mean([np.corrcoef(y_s[:, j], y_t[:, j])[0, 1] for j in range(y_s.shape[1])])
    return tau**2 * inter, tau**2 * intra


def test_matches_numpy_corrcoef():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [0.2, 0.1, -0.4]])
    t = torch.tensor([[0.3, 2.5, -1.0], [1.0, 1.0, 2.0], [2.0, -2.0, 0.0]])
    for tau in (1.0, 4.0):
        inter, intra = dist_terms(s, t, tau)
        ref_inter, ref_intra = dist_by_numpy(s, t, tau)
        assert inter.item() == pytest.approx(ref_inter, rel=1e-4, abs=1e-6)
        assert intra.item() == pytest.approx(ref_intra, rel=1e-4, abs=1e-6)


def test_two_sample_two_class_by_hand():
    # With 2 classes each probability row is (p, 1 - p): centred it is +-(p - 1/2), so the
    # per-sample Pearson correlation is sign(p_s - 1/2) * sign(p_t - 1/2). Rows 0 agree, row 1
    # disagrees: inter = 1 - (1 + (-1)) / 2 = 1 (tau = 1).
    s = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    inter, _ = dist_terms(s, t, 1.0)
    assert inter.item() == pytest.approx(1.0, abs=1e-6)


def test_zero_when_equal_and_weighted_terms():
    # Logits spread like a trained model's: with near-uniform predictions the official eps=1e-8
    # in the Pearson denominator is no longer negligible against the tiny centred norms.
    t = 5 * torch.randn(6, 5)
    d = DIST(beta=2.0, gamma=3.0, tau=4.0)
    terms = d(Outputs(logits=t.clone()), Outputs(logits=t), {})
    assert set(terms) == {"inter", "intra"}
    # 1 - correlation is zero up to float32 rounding, before the scaling by weight * tau^2
    assert terms["inter"].item() / (2.0 * 16) == pytest.approx(0, abs=1e-6)
    assert terms["intra"].item() / (3.0 * 16) == pytest.approx(0, abs=1e-6)
    s = torch.randn(6, 5)
    inter, intra = dist_terms(s, t, 4.0)
    terms = d(Outputs(logits=s), Outputs(logits=t), {})
    assert terms["inter"].item() == pytest.approx(2.0 * inter.item(), rel=1e-6)
    assert terms["intra"].item() == pytest.approx(3.0 * intra.item(), rel=1e-6)
    with pytest.raises(KdkitError, match="tau"):
        DIST(tau=0)


def test_gradients_reach_the_whole_student_only():
    d = DIST()
    pair = Pair(d)
    distill_backward(d, pair, image_batch())
    assert_gradients(pair, d, ["conv1", "layer1", "layer2", "layer3", "fc"])


def test_yaml_instantiates_and_runs():
    d = from_yaml("dist")
    assert (d.beta, d.gamma, d.tau) == (2.0, 2.0, 4.0)
    pair = Pair(d)
    batch = image_batch()
    terms = d(pair.student_outputs(batch), pair.teacher_outputs(batch), batch)
    assert set(terms) == {"inter", "intra"} and all(torch.isfinite(v) and v > 0 for v in terms.values())
