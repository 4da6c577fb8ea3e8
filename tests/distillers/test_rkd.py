import math

import pytest
import torch

from kdkit.distillers.rkd import RKD, rkd_angle, rkd_distance
from kdkit.outputs import Outputs

from .helpers import Pair, assert_gradients, distill_backward, from_yaml, image_batch


def huber(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def rkd_by_loops(s, t):
    s, t = s.tolist(), t.tolist()
    n = len(s)

    def distances(e):
        d = [[math.dist(e[i], e[j]) for j in range(n)] for i in range(n)]
        mu = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[v / mu for v in row] for row in d]

    def cos(e, i, j, k):  # angle at e_j between e_i and e_k; 0 when a side has zero length
        u = [a - b for a, b in zip(e[i], e[j])]
        v = [a - b for a, b in zip(e[k], e[j])]
        nu, nv = math.hypot(*u), math.hypot(*v)
        return 0.0 if nu == 0 or nv == 0 else sum(a * b for a, b in zip(u, v)) / (nu * nv)

    ds, dt = distances(s), distances(t)
    dist = sum(huber(ds[i][j], dt[i][j]) for i in range(n) for j in range(n)) / n**2
    ang = sum(huber(cos(s, i, j, k), cos(t, i, j, k))
              for i in range(n) for j in range(n) for k in range(n)) / n**3
    return dist, ang


def test_matches_loops():
    torch.manual_seed(0)
    s, t = torch.randn(5, 3), 4 * torch.randn(5, 4)  # widths may differ
    dist, ang = rkd_by_loops(s, t)
    assert rkd_distance(s, t).item() == pytest.approx(dist, rel=1e-4)
    assert rkd_angle(s, t).item() == pytest.approx(ang, rel=1e-4)


def test_right_triangle_by_hand():
    # student: right isosceles triangle (0,0), (1,0), (0,1); teacher: degenerate (0,0), (1,0), (2,0).
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    # student angle cosines: at vertex 0: 0; at 1 and 2: 1/sqrt(2). teacher: at 0 and 2: 1; at 1: -1.
    # each vertex appears in 2 ordered off-diagonal triplets (i, k) and (k, i):
    c = 1 / math.sqrt(2)
    expected = 2 * (huber(0, 1) + huber(c, -1) + huber(c, 1)) / 27
    assert rkd_angle(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_invariant_to_rotation_translation_and_scale_of_the_teacher():
    torch.manual_seed(1)
    s = torch.randn(6, 2)
    theta = torch.tensor(0.7)
    rot = torch.stack([torch.stack([theta.cos(), -theta.sin()]), torch.stack([theta.sin(), theta.cos()])])
    t = 3.0 * s @ rot.T + torch.tensor([5.0, -2.0])
    terms = RKD()(Outputs(embedding=s), Outputs(embedding=t), {})
    assert set(terms) == {"distance", "angle"}
    assert terms["distance"].item() == pytest.approx(0, abs=1e-4)
    assert terms["angle"].item() == pytest.approx(0, abs=1e-4)


def test_terms_carry_their_sub_weights():
    torch.manual_seed(2)
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    terms = RKD(distance_weight=25, angle_weight=50)(Outputs(embedding=s), Outputs(embedding=t), {})
    assert terms["distance"].item() == pytest.approx(25 * rkd_distance(s, t).item(), rel=1e-6)
    assert terms["angle"].item() == pytest.approx(50 * rkd_angle(s, t).item(), rel=1e-6)


def test_gradients_reach_the_student_below_the_classifier():
    d = RKD()
    pair = Pair(d)
    distill_backward(d, pair, image_batch())
    assert_gradients(pair, d, ["conv1", "layer1", "layer2", "layer3"])  # embedding = fc input


def test_yaml_instantiates_and_runs():
    d = from_yaml("rkd")
    assert (d.distance_weight, d.angle_weight, d.weight) == (25.0, 50.0, 1.0)
    pair = Pair(d)
    batch = image_batch()
    terms = d(pair.student_outputs(batch), pair.teacher_outputs(batch), batch)
    assert set(terms) == {"distance", "angle"} and all(torch.isfinite(v) and v > 0 for v in terms.values())
