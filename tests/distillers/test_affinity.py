import math

import pytest

from kdkit.distillers.affinity import Affinity, soft_cross_entropy

from .clip_helpers import assert_only_student_learns, case
from .helpers import from_yaml
from .test_clip_crd import softmax_rows


def soft_ce_by_loops(s_rows, s_cols, s_scale, t_rows, t_cols, t_scale) -> float:
    """1/B sum_i -sum_j p_T(j|i) log p_S(j|i)."""
    p_s, p_t = softmax_rows(s_rows, s_cols, s_scale), softmax_rows(t_rows, t_cols, t_scale)
    return -sum(pt * math.log(ps) for rs, rt in zip(p_s, p_t) for ps, pt in zip(rs, rt)) / len(p_s)


def test_soft_cross_entropy_by_hand():
    import torch

    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, math.log(3.0)]])  # p_T = (1/4, 3/4)
    assert soft_cross_entropy(s, t).item() == pytest.approx(math.log(2.0), rel=1e-6)


def test_affinity_both_directions_by_loops():
    student, inputs, teacher = case(s_dim=3, t_dim=5)
    s = student(*inputs)
    terms = Affinity()(s, teacher, {})
    s_img, s_txt, s_scale = s.embedding, s.features["text_embedding"], s.features["logit_scale"].item()
    t_img, t_txt = teacher.embedding, teacher.features["text_embedding"]
    assert terms["i2t"].item() == pytest.approx(soft_ce_by_loops(s_img, s_txt, s_scale, t_img, t_txt, 20.0), rel=1e-5)
    assert terms["t2i"].item() == pytest.approx(soft_ce_by_loops(s_txt, s_img, s_scale, t_txt, t_img, 20.0), rel=1e-5)


def test_gradients_reach_the_student_and_its_scale():
    student, inputs, teacher = case()
    d = Affinity()
    sum(d(student(*inputs), teacher, {}).values()).backward()
    assert_only_student_learns(student, d, teacher, scale_learns=True)


def test_yaml():
    d = from_yaml("affinity")
    assert isinstance(d, Affinity) and d.weight == 0.5
