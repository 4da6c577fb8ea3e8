import math

import numpy as np
import pytest
import torch

from kdkit.distillers.pkt import PKT, pkt_loss
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

from .helpers import Pair, assert_gradients, distill_backward, from_yaml, image_batch, run_once


def pkt_by_loops(s, t, eps=1e-7):
    """Conditional densities and the KL with explicit loops, in float64 numpy."""

    def conditionals(x):
        x = x.double().numpy().reshape(len(x), -1)
        b = len(x)
        k = np.empty((b, b))
        for i in range(b):
            for j in range(b):
                cos = x[i] @ x[j] / (np.linalg.norm(x[i]) * np.linalg.norm(x[j]))
                k[i, j] = (1 + cos) / 2
        return k / k.sum(axis=1, keepdims=True)

    p, q = conditionals(t), conditionals(s)
    b = len(p)
    return sum(p[i, j] * math.log((p[i, j] + eps) / (q[i, j] + eps)) for i in range(b) for j in range(b)) / b**2


def test_value_by_hand():
    # student rows orthogonal: K = [[1, .5], [.5, 1]] -> q = [[2/3, 1/3], [1/3, 2/3]];
    # teacher rows opposite: K = [[1, 0], [0, 1]] -> p = I; loss = (2 * 1 * log(1 / (2/3))) / 4
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 1.0], [-3.0, -3.0]])
    assert pkt_loss(s, t).item() == pytest.approx(math.log(1.5) / 2, rel=1e-5)


def test_matches_loops_for_different_widths():
    torch.manual_seed(0)
    s, t = torch.randn(5, 3), torch.randn(5, 7)
    assert pkt_loss(s, t).item() == pytest.approx(pkt_by_loops(s, t), rel=1e-4)


def test_zero_when_directions_agree_and_invariant_to_scale():
    torch.manual_seed(1)
    e = torch.randn(4, 6)
    assert pkt_loss(3.0 * e, e).item() == pytest.approx(0, abs=1e-7)
    assert pkt_loss(e, e * torch.tensor([[1.0], [2.0], [0.5], [4.0]])).item() == pytest.approx(0, abs=1e-7)


def test_reads_the_embeddings_and_checks_the_batch():
    torch.manual_seed(2)
    s, t = torch.randn(3, 4), torch.randn(3, 5)
    d = PKT()
    assert d(Outputs(embedding=s), Outputs(embedding=t), {})["loss"].item() == pytest.approx(pkt_by_loops(s, t), rel=1e-4)
    with pytest.raises(KdkitError, match="batch 3 != teacher batch 2"):
        d(Outputs(embedding=s), Outputs(embedding=t[:2]), {})
    with pytest.raises(KdkitError, match="embedding"):
        d(Outputs(logits=s), Outputs(embedding=t), {})
    with pytest.raises(KdkitError, match="eps"):
        PKT(eps=0)


def test_gradients_reach_the_student_below_the_classifier():
    d = PKT()
    pair = Pair(d)
    terms = distill_backward(d, pair, image_batch())
    assert terms["loss"] > 0
    assert_gradients(pair, d, ["conv1", "layer1", "layer2", "layer3"])


def test_yaml_instantiates_and_runs():
    d = from_yaml("pkt")
    assert (d.weight, d.eps) == (30000.0, 1e-7)
    loss = run_once(d)["loss"]
    assert torch.isfinite(loss) and loss > 0
