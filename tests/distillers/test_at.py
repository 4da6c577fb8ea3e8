import math

import pytest
import torch
import torch.nn.functional as F

from kdkit.distillers.at import AT, at_loss
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

from .helpers import Pair, assert_gradients, distill_backward, from_yaml, image_batch, run_once


def at_by_loops(f_s, f_t, p=2):
    """Attention maps and squared differences with explicit loops over batch and pixels."""
    b, _, h, w = f_s.shape
    total = 0.0
    for i in range(b):
        maps = []
        for f in (f_s[i], f_t[i]):
            a = [sum(abs(f[c, y, x].item()) ** p for c in range(f.shape[0])) / f.shape[0]
                 for y in range(h) for x in range(w)]
            norm = math.sqrt(sum(v * v for v in a))
            maps.append([v / norm for v in a])
        total += sum((u - v) ** 2 for u, v in zip(*maps))
    return total / (b * h * w)


def test_value_by_hand():
    # student channel means of squares [[1, 0], [0, 0.5]] -> Q_s = (1, 0, 0, 0.5) / sqrt(1.25);
    # teacher Q_t = (0, 1, 0, 0); squared differences 0.8, 1, 0, 0.2 -> mean 0.5
    f_s = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 0.0]]]])
    f_t = torch.tensor([[[[0.0, 3.0], [0.0, 0.0]]]])
    assert at_loss(f_s, f_t).item() == pytest.approx(0.5, rel=1e-6)


def test_matches_loops_and_ignores_channel_counts():
    torch.manual_seed(0)
    f_s, f_t = torch.randn(2, 3, 3, 3), torch.randn(2, 5, 3, 3)
    assert at_loss(f_s, f_t).item() == pytest.approx(at_by_loops(f_s, f_t), rel=1e-5)
    # the same activations repeated over more channels give the same attention map
    assert at_loss(f_s, f_s.repeat(1, 2, 1, 1)).item() == pytest.approx(0, abs=1e-7)


def test_spatial_mismatch_pools_the_larger_map():
    torch.manual_seed(1)
    f_s, f_t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)
    pooled = F.avg_pool2d(f_s, 2)
    assert at_loss(f_s, f_t).item() == pytest.approx(at_by_loops(pooled, f_t), rel=1e-5)
    assert at_loss(f_t, f_s).item() == pytest.approx(at_by_loops(f_t, pooled), rel=1e-5)


def test_pairs_are_summed():
    torch.manual_seed(2)
    a_s, a_t, b_s, b_t = (torch.randn(2, 3, 4, 4) for _ in range(4))
    d = AT(pairs=[["a", "x"], ["b", "y"]])
    student = Outputs(features={"a": a_s, "b": b_s})
    teacher = Outputs(features={"x": a_t, "y": b_t})
    expected = at_by_loops(a_s, a_t) + at_by_loops(b_s, b_t)
    assert d(student, teacher, {})["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert d(student, Outputs(features={"x": a_s, "y": b_s}), {})["loss"].item() == pytest.approx(0, abs=1e-7)


def test_bad_pairs_and_vector_features():
    with pytest.raises(KdkitError, match="pairs"):
        AT(pairs=[["layer1"]])
    d = AT(pairs=[["e", "e"]])
    with pytest.raises(KdkitError, match=r"\(4,\).*\(6,\)"):
        d(Outputs(features={"e": torch.zeros(2, 4)}), Outputs(features={"e": torch.zeros(2, 6)}), {})


def test_gradients_reach_the_tapped_stages_only():
    d = AT(pairs=[["layer1", "layer1"], ["layer2", "layer3"]])
    pair = Pair(d)
    distill_backward(d, pair, image_batch())
    assert_gradients(pair, d, ["conv1", "layer1", "layer2"])


def test_yaml_instantiates_and_runs():
    d = from_yaml("at")
    assert d.pairs == [("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3")]
    assert (d.p, d.weight) == (2.0, 1000.0)
    loss = run_once(d)["loss"]
    assert torch.isfinite(loss) and loss > 0
