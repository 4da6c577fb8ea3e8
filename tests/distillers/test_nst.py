import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdkit.distillers.nst import NST, polynomial_mmd
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

from .helpers import Pair, assert_gradients, distill_backward, from_yaml, image_batch, run_once


def mmd_by_loops(f_s, f_t, d=2, c=0.0):
    """Squared MMD per sample with explicit loops over channel pairs, averaged over the batch."""
    total = 0.0
    for b in range(f_s.shape[0]):
        xs = [v / np.linalg.norm(v) for v in f_s[b].double().numpy().reshape(f_s.shape[1], -1)]
        xt = [v / np.linalg.norm(v) for v in f_t[b].double().numpy().reshape(f_t.shape[1], -1)]

        def mean_k(a, bb):
            return sum((x @ y + c) ** d for x in a for y in bb) / (len(a) * len(bb))

        total += mean_k(xt, xt) + mean_k(xs, xs) - 2 * mean_k(xs, xt)
    return total / f_s.shape[0]


def test_value_by_hand():
    # student channels e1, e2 (orthogonal); teacher's single channel e1:
    # k(t,t) = 1; mean k(s,s) = (1 + 0 + 0 + 1) / 4 = 1/2; mean k(s,t) = (1 + 0) / 2 = 1/2
    # MMD^2 = 1 + 1/2 - 2 * 1/2 = 1/2
    f_s = torch.tensor([[[[3.0, 0.0]], [[0.0, 2.0]]]])  # [1, 2, 1, 2]
    f_t = torch.tensor([[[[5.0, 0.0]]]])                # [1, 1, 1, 2]
    assert polynomial_mmd(f_s, f_t).item() == pytest.approx(0.5, rel=1e-6)


def test_matches_loops_for_other_kernels_and_channel_counts():
    torch.manual_seed(0)
    f_s, f_t = torch.randn(2, 3, 3, 3), torch.randn(2, 5, 3, 3)
    assert polynomial_mmd(f_s, f_t).item() == pytest.approx(mmd_by_loops(f_s, f_t), rel=1e-5)
    assert polynomial_mmd(f_s, f_t, 3, 0.5).item() == pytest.approx(mmd_by_loops(f_s, f_t, 3, 0.5), rel=1e-5)
    # the same channels in another order and repeated: the same distribution
    same = torch.cat([f_s.flip(1), f_s], dim=1)
    assert polynomial_mmd(f_s, same).item() == pytest.approx(0, abs=1e-6)


def test_spatial_mismatch_pools_the_larger_map():
    torch.manual_seed(1)
    f_s, f_t = torch.randn(2, 3, 4, 4), torch.randn(2, 2, 2, 2)
    pooled = F.avg_pool2d(f_s, 2)
    assert polynomial_mmd(f_s, f_t).item() == pytest.approx(mmd_by_loops(pooled, f_t), rel=1e-5)


def test_pairs_are_summed_and_errors():
    torch.manual_seed(2)
    a_s, a_t, b_s, b_t = (torch.randn(2, 3, 2, 2) for _ in range(4))
    d = NST(pairs=[["a", "x"], ["b", "y"]])
    assert (d.student_features, d.teacher_features) == (["a", "b"], ["x", "y"])
    expected = mmd_by_loops(a_s, a_t) + mmd_by_loops(b_s, b_t)
    loss = d(Outputs(features={"a": a_s, "b": b_s}), Outputs(features={"x": a_t, "y": b_t}), {})["loss"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(KdkitError, match=r"nst: pair \[a, x\] needs maps .* student \(4,\) and teacher \(3, 2, 2\)"):
        d(Outputs(features={"a": torch.zeros(2, 4), "b": b_s}), Outputs(features={"x": a_t, "y": b_t}), {})
    with pytest.raises(KdkitError, match="nst.pairs"):
        NST(pairs=[["layer1"]])
    with pytest.raises(KdkitError, match="degree"):
        NST(degree=0)


def test_gradients_reach_the_tapped_stages_only():
    d = NST(pairs=[["layer1", "layer1"], ["layer2", "layer3"]])
    pair = Pair(d)
    distill_backward(d, pair, image_batch())
    assert_gradients(pair, d, ["conv1", "layer1", "layer2"])


def test_yaml_instantiates_and_runs():
    d = from_yaml("nst")
    assert d.pairs == [("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3")]
    assert (d.weight, d.degree, d.c) == (50.0, 2, 0.0)
    loss = run_once(d)["loss"]
    assert torch.isfinite(loss) and loss > 0
