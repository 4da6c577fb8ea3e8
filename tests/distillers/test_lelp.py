import math

import numpy as np
import pytest
import torch

from kdkit.distillers.base import DistillContext
from kdkit.distillers.lelp import LELP, merge_moments, subspace_step
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

from .helpers import Pair, assert_gradients, build, distill_backward, from_yaml, image_batch


def built_lelp(c=2, d=3, ds=2, directions=1) -> LELP:
    torch.manual_seed(0)
    lelp = LELP(directions=directions)
    lelp.build(Outputs(embedding=torch.zeros(1, ds)), Outputs(logits=torch.zeros(1, c), embedding=torch.zeros(1, d)),
               DistillContext())
    return lelp


def test_running_moments_match_numpy_over_two_batches():
    g = torch.Generator().manual_seed(1)
    x1, y1 = torch.randn(5, 3, generator=g) + 4.0, torch.tensor([0, 0, 2, 0, 2])
    x2, y2 = torch.randn(4, 3, generator=g) - 1.0, torch.tensor([1, 0, 1, 1])
    state = (torch.zeros(3), torch.zeros(3, 3), torch.zeros(3, 3, 3))
    state = merge_moments(*state, x1, y1)
    count, mean, m2 = merge_moments(*state, x2, y2)
    x, y = torch.cat([x1, x2]).numpy().astype(np.float64), torch.cat([y1, y2]).numpy()
    for c in range(3):
        rows = x[y == c]
        assert count[c].item() == len(rows)
        assert np.allclose(mean[c].numpy(), rows.mean(0), atol=1e-5)
        cov = (rows - rows.mean(0)).T @ (rows - rows.mean(0)) / len(rows)  # population covariance
        assert np.allclose((m2[c] / count[c]).numpy(), cov, atol=1e-5)


def test_subspace_iteration_finds_the_top_directions_with_a_stable_sign():
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    cov = basis @ np.diag([5.0, 2.0, 1.0, 0.5]) @ basis.T
    dirs = torch.linalg.qr(torch.randn(1, 4, 2))[0]
    for _ in range(60):
        before, dirs = dirs, subspace_step(torch.tensor(cov[None], dtype=torch.float32), dirs)
    top = np.linalg.eigh(cov)[1][:, ::-1][:, :2]  # numpy: eigenvectors of the 2 largest eigenvalues
    cosines = np.abs(np.sum(top * dirs[0].numpy(), axis=0))
    assert np.all(cosines > 0.9999)
    assert torch.allclose(before, dirs, atol=1e-5)  # converged: no sign flip between steps
    zero = subspace_step(torch.zeros(1, 4, 4), dirs)  # an unseen class keeps its directions
    assert torch.allclose(zero, dirs, atol=1e-6)


def test_pseudo_labels_and_loss_by_hand():
    d = built_lelp(c=2, d=3, ds=2, directions=1).eval()
    # Class 0: mean 0, top direction e1 with variance 4; class 1: mean (1, 1, 0), direction e2, variance 9.
    d.count.fill_(10.0)
    d.mean.copy_(torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))
    d.m2.copy_(10.0 * torch.stack([torch.diag(torch.tensor([4.0, 1.0, 1.0])),
                                   torch.diag(torch.tensor([1.0, 9.0, 1.0]))]))
    d.dirs.copy_(torch.tensor([[[1.0], [0.0], [0.0]], [[0.0], [1.0], [0.0]]]))
    with torch.no_grad():
        d.head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]))
        d.head.bias.zero_()
    h_t = torch.tensor([[2.0, 5.0, 0.0], [-1.0, 0.0, 3.0], [1.0, -2.0, 0.0], [1.0, 4.0, 7.0]])
    label = torch.tensor([0, 0, 1, 1])
    h_s = torch.tensor([[1.0, 2.0], [0.0, -1.0], [0.5, 0.5], [2.0, 0.0]])
    loss = d(Outputs(embedding=h_s), Outputs(embedding=h_t), {"label": label})["loss"]

    # By hand: projection p = (h - mu_y) . u_y / sqrt(var_y); subclass 0 if p >= -p else 1.
    mus, axes, sds = [(0, 0, 0), (1, 1, 0)], [0, 1], [2.0, 3.0]
    targets = []
    for h, y in zip(h_t.tolist(), label.tolist()):
        p = (h[axes[y]] - mus[y][axes[y]]) / sds[y]
        targets.append(2 * y + (0 if p >= -p else 1))
    assert targets == [0, 1, 3, 2]
    assert d.pseudo_labels(h_t, label).tolist() == targets
    expected = 0.0
    for (a, b), t in zip(h_s.tolist(), targets):
        logits = [a, b, a + b, -a]  # W h_s
        expected -= logits[t] - math.log(sum(math.exp(z) for z in logits))
    assert loss.item() == pytest.approx(expected / 4, rel=1e-6)


def test_training_updates_statistics_and_eval_does_not():
    d = built_lelp(c=2, d=3, ds=2, directions=1)
    h_t, label = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 1, 1])
    student, teacher = Outputs(embedding=torch.randn(6, 2)), Outputs(embedding=h_t)
    d.eval()(student, teacher, {"label": label})
    assert d.count.tolist() == [0.0, 0.0]
    d.train()(student, teacher, {"label": label})
    assert d.count.tolist() == [2.0, 4.0]
    assert torch.allclose(d.mean[1], h_t[label == 1].mean(0), atol=1e-6)
    assert {"count", "mean", "m2", "dirs", "head.weight"} <= set(d.state_dict())  # in checkpoints
    # moments of the gathered rows of every rank: kept in sync by each rank, not by DDP's broadcast
    assert set(d.rank_synced_buffers) == {"count", "mean", "m2", "dirs"} <= dict(d.named_buffers()).keys()
    assert LELP().rank_synced_buffers == ()


def test_gradients_reach_backbone_and_head_only():
    d = LELP()
    pair = Pair(d)
    batch = image_batch()
    build(d, pair, batch)
    terms = distill_backward(d, pair, batch)
    assert set(terms) == {"loss"}
    assert_gradients(pair, d, ["conv1", "layer1", "layer2", "layer3"])  # not the main head fc


def test_yaml_instantiates_and_runs():
    d = from_yaml("lelp")
    assert (d.weight, d.directions, d.subclasses) == (1.0, 2, 4)
    pair = Pair(d)
    batch = image_batch()
    build(d, pair, batch)
    assert d.head.in_features == 16 and d.head.out_features == 5 * 4 and d.dirs.shape == (5, 24, 2)
    loss = d.train()(pair.student_outputs(batch), pair.teacher_outputs(batch), batch)["loss"]
    assert torch.isfinite(loss) and loss > 0
    assert d.count.sum().item() == 6


def test_bad_settings():
    with pytest.raises(KdkitError, match="directions"):
        LELP(directions=0)
    with pytest.raises(KdkitError, match="exceeds the teacher embedding width 3"):
        built_lelp(d=3, directions=4)
    with pytest.raises(KdkitError, match="number of classes"):
        LELP().build(Outputs(embedding=torch.zeros(1, 2)), Outputs(embedding=torch.zeros(1, 3)),
                     DistillContext())
    d = built_lelp()
    with pytest.raises(KdkitError, match="label"):
        d(Outputs(embedding=torch.zeros(2, 2)), Outputs(embedding=torch.zeros(2, 3)), {})
    with pytest.raises(RuntimeError, match="build"):
        LELP()(Outputs(embedding=torch.zeros(2, 2)), Outputs(embedding=torch.zeros(2, 3)), {"label": torch.zeros(2)})
