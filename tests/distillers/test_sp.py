import math

import numpy as np
import pytest
import torch

from kdkit.distillers.sp import SP, sp_loss
from kdkit.outputs import Outputs

from .helpers import Pair, assert_gradients, distill_backward, from_yaml, image_batch, run_once


def sp_by_numpy(f_s, f_t):
    def g(f):
        q = f.double().numpy().reshape(f.shape[0], -1)
        gram = q @ q.T
        return gram / np.linalg.norm(gram, axis=1, keepdims=True)

    b = f_s.shape[0]
    return float(np.linalg.norm(g(f_s) - g(f_t), "fro") ** 2 / b**2)


def test_value_by_hand():
    # G_s = I; teacher rows are equal so G_t has all entries 1/sqrt(2):
    # ||G_s - G_t||_F^2 = 2 (1 - 1/sqrt(2))^2 + 2 (1/2) = 4 - 2 sqrt(2); / B^2 = 1 - 1/sqrt(2)
    f_s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    f_t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert sp_loss(f_s, f_t).item() == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-6)


def test_matches_numpy_for_maps_of_different_shapes():
    torch.manual_seed(0)
    f_s, f_t = torch.randn(4, 3, 2, 2), torch.randn(4, 7, 5)
    assert sp_loss(f_s, f_t).item() == pytest.approx(sp_by_numpy(f_s, f_t), rel=1e-5)


def test_zero_when_equal_and_scale_invariant():
    torch.manual_seed(1)
    f = torch.randn(5, 6)
    assert sp_loss(f, f.clone()).item() == pytest.approx(0, abs=1e-7)
    assert sp_loss(f, 3.0 * f).item() == pytest.approx(0, abs=1e-7)  # rows of G are normalised


def test_embedding_default_and_named_pairs():
    torch.manual_seed(2)
    e_s, e_t = torch.randn(3, 4), torch.randn(3, 6)
    m_s, m_t = torch.randn(3, 2, 2, 2), torch.randn(3, 5, 2, 2)
    student = Outputs(embedding=e_s, features={"a": m_s})
    teacher = Outputs(embedding=e_t, features={"b": m_t})
    assert SP()(student, teacher, {})["loss"].item() == pytest.approx(sp_by_numpy(e_s, e_t), rel=1e-5)
    d = SP(pairs=[["a", "b"], ["a", "b"]])
    assert d.student_features == ["a", "a"] and d.teacher_features == ["b", "b"]
    assert d(student, teacher, {})["loss"].item() == pytest.approx(2 * sp_by_numpy(m_s, m_t), rel=1e-5)


def test_gradients_reach_the_student_below_the_classifier():
    d = SP()
    pair = Pair(d)
    distill_backward(d, pair, image_batch())
    assert_gradients(pair, d, ["conv1", "layer1", "layer2", "layer3"])


def test_yaml_instantiates_and_runs():
    d = from_yaml("sp")
    assert d.pairs is None and d.weight == 3000.0
    loss = run_once(d)["loss"]
    assert torch.isfinite(loss) and loss > 0
