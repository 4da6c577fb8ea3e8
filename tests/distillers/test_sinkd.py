import numpy as np
import pytest
import torch

from kdkit.distillers.sinkd import SinKD, cost_matrix, sinkhorn_distance, sinkhorn_plan
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

from .helpers import Pair, assert_gradients, distill_backward, from_yaml, image_batch


def numpy_sinkhorn(C, eps, iters):
    """The textbook scaling iterations: u = a / (K v), v = b / (K^T u), P = diag(u) K diag(v)."""
    n, m = C.shape
    a, b = np.full(n, 1 / n), np.full(m, 1 / m)
    K = np.exp(-C / eps)
    v = np.ones(m)
    for _ in range(iters):
        u = a / (K @ v)
        v = b / (K.T @ u)
    return u[:, None] * K * v[None, :]


def probs(seed, b=4, c=5):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, c, generator=g, dtype=torch.float64) * 2, 1)


def test_cost_matrices_by_hand():
    p, q = torch.tensor([[1.0, 0.0], [0.5, 0.5]]), torch.tensor([[0.0, 1.0]])
    assert cost_matrix(p, q, "sqeuclidean").flatten().tolist() == pytest.approx([2.0, 0.5])
    assert cost_matrix(p, q, "euclidean").flatten().tolist() == pytest.approx([2**0.5, 0.5**0.5])
    assert cost_matrix(p, q, "cosine").flatten().tolist() == pytest.approx([1.0, 1 - 0.5**0.5])


def test_plan_and_distance_match_numpy():
    p_s, p_t = probs(0), probs(1)
    C = cost_matrix(p_s, p_t, "sqeuclidean")
    for eps, iters in ((0.1, 20), (0.05, 7)):
        ref = numpy_sinkhorn(C.numpy(), eps, iters)
        plan = sinkhorn_plan(C, eps, iters)
        np.testing.assert_allclose(plan.numpy(), ref, rtol=1e-8, atol=1e-12)
        assert sinkhorn_distance(p_s, p_t, eps, iters).item() == pytest.approx(float((ref * C.numpy()).sum()), rel=1e-6)


def test_plan_marginals_are_uniform():
    C = cost_matrix(probs(2, b=6), probs(3, b=6), "sqeuclidean")
    plan = sinkhorn_plan(C, 0.1, 3)
    np.testing.assert_allclose(plan.sum(0).numpy(), 1 / 6, rtol=1e-10)  # columns: exact
    plan = sinkhorn_plan(C, 0.1, 500)
    np.testing.assert_allclose(plan.sum(1).numpy(), 1 / 6, rtol=1e-6)  # rows: at convergence
    assert plan.sum().item() == pytest.approx(1.0)


def test_log_space_is_stable_where_the_kernel_underflows():
    C = cost_matrix(probs(4), probs(5), "sqeuclidean") * 1e3  # exp(-C / eps) underflows to 0
    plan = sinkhorn_plan(C, 1e-3, 50)
    assert torch.isfinite(plan).all() and plan.sum().item() == pytest.approx(1.0, rel=1e-6)


def test_zero_cost_for_identical_one_hot_batches():
    t = torch.eye(4) * 50
    assert SinKD()(Outputs(logits=t.clone()), Outputs(logits=t), {})["loss"].item() == pytest.approx(0, abs=1e-6)


def test_gradients_reach_the_whole_student_only():
    for cost in ("sqeuclidean", "cosine"):
        d = SinKD(cost=cost)
        pair = Pair(d)
        distill_backward(d, pair, image_batch())
        assert_gradients(pair, d, ["conv1", "layer1", "layer2", "layer3", "fc"])


def test_yaml_instantiates_and_runs():
    d = from_yaml("sinkd")
    assert isinstance(d, SinKD) and (d.epsilon, d.iterations, d.cost) == (0.1, 20, "sqeuclidean")
    pair = Pair(d)
    batch = image_batch()
    terms = d(pair.student_outputs(batch), pair.teacher_outputs(batch), batch)
    assert set(terms) == {"loss"} and torch.isfinite(terms["loss"]) and terms["loss"] > 0


def test_bad_settings():
    with pytest.raises(KdkitError, match="epsilon"):
        SinKD(epsilon=0)
    with pytest.raises(KdkitError, match="temperature"):
        SinKD(temperature=-1)
    with pytest.raises(KdkitError, match="iterations"):
        SinKD(iterations=0)
    with pytest.raises(KdkitError, match="cost"):
        SinKD(cost="l1")
    with pytest.raises(KdkitError, match=r"\(3,\).*\(4,\)"):
        SinKD()(Outputs(logits=torch.zeros(2, 3)), Outputs(logits=torch.zeros(2, 4)), {})
