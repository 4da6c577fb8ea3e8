import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdkit.distillers.base import DistillContext
from kdkit.distillers.cc import CC, taylor_rbf_correlation
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

from .helpers import Pair, assert_gradients, build, distill_backward, from_yaml, image_batch, run_once


def correlation_by_loops(f: np.ndarray, gamma: float, order: int) -> np.ndarray:
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    b = len(f)
    out = np.zeros((b, b))
    for i in range(b):
        for j in range(b):
            dot = float(f[i] @ f[j])
            out[i, j] = sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * dot ** p
                            for p in range(order + 1))
    return out


def test_correlation_by_hand_and_converges_to_the_rbf_kernel():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    c = taylor_rbf_correlation(f, 0.4, 2)
    e = math.exp(-0.8)
    assert c[0, 0].item() == pytest.approx(e * (1 + 0.8 + 0.32), rel=1e-6)  # x.y = 1
    assert c[0, 1].item() == pytest.approx(e, rel=1e-6)                     # x.y = 0
    assert c[0, 2].item() == pytest.approx(e * (1 - 0.8 + 0.32), rel=1e-6)  # x.y = -1
    torch.manual_seed(0)
    g = F.normalize(torch.randn(5, 4), dim=1)
    exact = torch.exp(-0.4 * torch.cdist(g.double(), g.double()) ** 2)
    assert torch.allclose(taylor_rbf_correlation(g, 0.4, 12).double(), exact, atol=1e-6)


def test_loss_by_loops_with_identity_heads():
    torch.manual_seed(1)
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    d = CC(embed_dim=3, gamma=0.4, order=2)
    d.build(Outputs(embedding=s), Outputs(embedding=t), DistillContext())
    with torch.no_grad():
        for head in (d.embed_s, d.embed_t):
            head.linear.weight.copy_(torch.eye(3))
            head.linear.bias.zero_()
    c_s = correlation_by_loops(s.double().numpy(), 0.4, 2)
    c_t = correlation_by_loops(t.double().numpy(), 0.4, 2)
    expected = float(np.linalg.norm(c_s - c_t, "fro") ** 2 / 16)
    loss = d(Outputs(embedding=s), Outputs(embedding=t), {})["loss"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert d(Outputs(embedding=s), Outputs(embedding=s.clone()), {})["loss"].item() == pytest.approx(0, abs=1e-7)


def test_without_teacher_head_the_teacher_embedding_is_only_normalised():
    torch.manual_seed(2)
    s, t = torch.randn(3, 4), torch.randn(3, 7)
    d = CC(embed_dim=5, project_teacher=False)
    d.build(Outputs(embedding=s), Outputs(embedding=t), DistillContext())
    assert d.embed_t is None and not any(k.startswith("embed_t") for k in d.state_dict())
    f_s = d.embed_s(s).detach().double().numpy()
    expected = np.mean((correlation_by_loops(f_s, 0.4, 2) - correlation_by_loops(t.double().numpy(), 0.4, 2)) ** 2)
    assert d(Outputs(embedding=s), Outputs(embedding=t), {})["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_bad_settings_are_refused():
    with pytest.raises(KdkitError, match="gamma > 0"):
        CC(gamma=0.0)
    with pytest.raises(KdkitError, match="order >= 0"):
        CC(order=-1)
    with pytest.raises(KdkitError, match="cc needs 'embedding'"):
        CC().build(Outputs(), Outputs(embedding=torch.zeros(2, 3)), DistillContext())


def test_gradients_reach_the_student_and_both_heads_only():
    d = CC(embed_dim=8)
    pair = Pair(d)
    batch = image_batch()
    build(d, pair, batch)
    distill_backward(d, pair, batch)
    assert_gradients(pair, d, ["conv1", "layer1", "layer2", "layer3"])


def test_yaml_instantiates_and_runs():
    d = from_yaml("cc")
    assert (d.weight, d.embed_dim, d.gamma, d.order, d.project_teacher) == (0.02, 128, 0.4, 2, True)
    loss = run_once(d)["loss"]
    assert torch.isfinite(loss) and loss > 0
