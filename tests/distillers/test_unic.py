import pytest
import torch

from kdkit.distillers.unic import UNIC, per_sample_regression, teacher_dropping
from kdkit.errors import KdkitError

from .helpers import from_yaml, image_batch
from .multi import assert_only_student_and_distillers_learn, backward, multi_task


def test_regression_by_hand():
    p = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    t = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    # row 0: cos = 0 -> 1; smoothL1: |d| = 1, 1 -> 0.5 each -> mean 0.5
    # row 1: cos = 1 -> 0; smoothL1: 0 and |2| -> 1.5 -> mean 0.75
    got = per_sample_regression(p, t, 0.5, 0.5)
    assert got.tolist() == pytest.approx([0.5 * 1 + 0.5 * 0.5, 0.5 * 0 + 0.5 * 0.75])


def test_dropping_keeps_the_worst_fitted_teacher_per_sample():
    losses = torch.tensor([[1.0, 5.0, 0.1], [2.0, 0.5, 0.2], [0.5, 0.1, 9.0]])
    g = torch.Generator().manual_seed(0)
    keep = teacher_dropping(losses, drop_prob=0.999999, generator=g)
    assert keep.tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 1]]
    assert teacher_dropping(losses, 0.0).sum() == 9
    # about drop_prob of the other entries are dropped
    big = torch.rand(4, 20000)
    frac = 1 - (teacher_dropping(big, 0.5, torch.Generator().manual_seed(1)).sum() - 20000) / (3 * 20000)
    assert frac.item() == pytest.approx(0.5, abs=0.02)


def test_heads_per_teacher_and_loss_without_dropping():
    task = multi_task({"unic": UNIC(drop_prob=0.0, hidden=7)})
    heads = task.distillers["unic"].heads
    assert set(heads) == {"t0", "t1"}
    assert heads["t0"][0].in_features == 16 and heads["t0"][2].out_features == 24 and heads["t1"][2].out_features == 32
    batch = image_batch(seed=3)
    losses = backward(task, batch)
    with torch.no_grad():
        s = task.student_outputs(batch).embedding
        per = [per_sample_regression(heads[n](s), task.teacher_outputs(batch, n).embedding, 0.5, 0.5).mean()
               for n in ("t0", "t1")]
    assert losses["unic"].item() == pytest.approx(sum(per).item() / 2, rel=1e-5)
    assert_only_student_and_distillers_learn(task)
    for p in heads.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_dropping_changes_the_loss_only_in_training():
    task = multi_task({"unic": UNIC(drop_prob=0.9)})
    d = task.distillers["unic"]
    batch = image_batch(seed=4)
    with torch.no_grad():
        s = task.student_outputs(batch)
        ts = {n: task.teacher_outputs(batch, n) for n in ("t0", "t1")}
        full = d.losses_per_teacher(s, ts)
        d.eval()
        assert d(s, ts, batch)["loss"].item() == pytest.approx(full.mean().item(), rel=1e-6)
        d.train()
        torch.manual_seed(0)
        dropped = d(s, ts, batch)["loss"].item()
    assert full.min().item() <= dropped <= full.max().item()  # a weighted mean of the same terms
    torch.manual_seed(0)
    coeffs = teacher_dropping(full, 0.9)  # the same draw the distiller made
    assert dropped == pytest.approx(((coeffs * full).sum() / coeffs.sum()).item(), rel=1e-6)


def test_errors_and_yaml():
    with pytest.raises(KdkitError, match="drop_prob"):
        UNIC(drop_prob=1.0)
    with pytest.raises(KdkitError, match="cos_weight"):
        UNIC(cos_weight=0, l1_weight=0)
    d = from_yaml("unic")
    assert isinstance(d, UNIC) and d.drop_prob == 0.5
