import math

import pytest
import torch

from kdkit.distillers.ensemble_kd import EnsembleKD, ensemble_kd_loss
from kdkit.distillers.kd import kd_loss
from kdkit.errors import KdkitError

from .helpers import from_yaml, image_batch
from .multi import assert_only_student_and_distillers_learn, backward, multi_task


def by_hand(s, teachers, weights, T):
    """T^2 * mean_i sum_j q_ij log(q_ij / p_ij), q = sum_k w_k softmax(t_k / T), with loops."""
    total = 0.0
    for i, s_row in enumerate(s.tolist()):
        zs = sum(math.exp(v / T) for v in s_row)
        q = [0.0] * len(s_row)
        for w, t in zip(weights, teachers):
            zt = sum(math.exp(v / T) for v in t[i].tolist())
            q = [qj + w * math.exp(v / T) / zt for qj, v in zip(q, t[i].tolist())]
        total += sum(qj * math.log(qj / (math.exp(a / T) / zs)) for qj, a in zip(q, s_row))
    return T * T * total / len(s)


def test_value_by_hand_with_fixed_weights():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t1 = torch.tensor([[0.3, 2.5, -1.0], [1.0, 1.0, 2.0]])
    t2 = torch.tensor([[2.0, 0.0, 0.0], [-1.0, 0.5, 0.2]])
    for T in (1.0, 3.0):
        got = ensemble_kd_loss(s, [t1, t2], torch.tensor([0.25, 0.75]), T).item()
        assert got == pytest.approx(by_hand(s, [t1, t2], [0.25, 0.75], T), rel=1e-5)


def test_one_teacher_is_plain_kd_and_identical_teachers_too():
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    assert ensemble_kd_loss(s, [t], torch.ones(1), 2.0).item() == pytest.approx(kd_loss(s, t, 2.0).item(), rel=1e-6)
    assert ensemble_kd_loss(s, [t, t], torch.tensor([0.5, 0.5]), 2.0).item() == pytest.approx(
        kd_loss(s, t, 2.0).item(), rel=1e-6)


def test_weights_are_normalised_and_checked():
    d = EnsembleKD(weights={"a": 1.0, "b": 3.0})
    assert d.mixing(["a", "b"]).tolist() == [0.25, 0.75]
    assert EnsembleKD().mixing(["a", "b", "c"]).tolist() == pytest.approx([1 / 3] * 3)
    with pytest.raises(KdkitError, match="no weight for teachers"):
        d.mixing(["a", "c"])
    with pytest.raises(KdkitError, match="non-negative"):
        EnsembleKD(weights={"a": -1.0})
    with pytest.raises(KdkitError, match="temperature"):
        EnsembleKD(temperature=0)


def test_in_a_task_reads_every_teacher_and_trains_only_the_student():
    task = multi_task({"ens": EnsembleKD(temperature=2.0)})
    batch = image_batch(seed=1)
    losses = backward(task, batch)
    with torch.no_grad():
        s = task.student_outputs(batch).logits
        ts = [task.teacher_outputs(batch, n).logits for n in ("t0", "t1")]
    assert losses["ens"].item() == pytest.approx(ensemble_kd_loss(s, ts, torch.tensor([0.5, 0.5]), 2.0).item(), rel=1e-5)
    assert_only_student_and_distillers_learn(task)


def test_a_subset_of_teachers_and_unknown_names():
    task = multi_task({"ens": EnsembleKD(teachers=["t1"])}, widths=(6, 8, 10))
    assert task.routes["ens"] == ["t1"]
    with pytest.raises(KdkitError, match=r"reads teachers \['nope'\].*t0, t1"):
        multi_task({"ens": EnsembleKD(teachers=["nope"])})


def test_yaml_instantiates():
    d = from_yaml("ensemble_kd")
    assert isinstance(d, EnsembleKD) and d.teacher_names is None and d.temperature == 4.0
