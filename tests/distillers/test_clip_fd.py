import pytest
import torch
import torch.nn.functional as F

from kdkit.distillers.clip_fd import ClipFD, feature_mimicry

from .clip_helpers import assert_only_student_learns, built, case
from .helpers import from_yaml


def fd_by_loops(student, teacher) -> float:
    """1/B sum_k sum_d (s_kd - t_kd)^2."""
    return sum(sum((a - b) ** 2 for a, b in zip(s, t)) for s, t in zip(student.tolist(), teacher.tolist())) / len(student)


def test_feature_mimicry_by_loops():
    s, t = torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.tensor([[0.0, 2.0], [3.0, 1.0]])
    assert feature_mimicry(s, t).item() == pytest.approx((1 + 0 + 9 + 4) / 2)


def test_same_width_needs_no_projection_and_matches_loops():
    student, inputs, teacher = case(s_dim=4, t_dim=4)
    d = built(ClipFD(), student, inputs, teacher)
    assert list(d.parameters()) == []  # identity projections
    s = student(*inputs)
    terms = d(s, teacher, {})
    assert terms["image"].item() == pytest.approx(fd_by_loops(s.embedding, teacher.embedding), rel=1e-6)
    assert terms["text"].item() == pytest.approx(
        fd_by_loops(s.features["text_embedding"], teacher.features["text_embedding"]), rel=1e-6)


def test_projection_when_widths_differ_and_gradients_reach_only_the_student():
    student, inputs, teacher = case(s_dim=3, t_dim=4)
    d = built(ClipFD(weight=2.0), student, inputs, teacher)
    assert d.image_proj.proj.weight.shape == (4, 3) and d.text_proj.proj.weight.shape == (4, 3)
    s = student(*inputs)
    terms = d(s, teacher, {})
    expected = F.normalize(s.embedding @ d.image_proj.proj.weight.T + d.image_proj.proj.bias, dim=-1)
    assert terms["image"].item() == pytest.approx(fd_by_loops(expected, teacher.embedding), rel=1e-5)
    assert 0 < terms["image"].item() <= 4 and 0 < terms["text"].item() <= 4  # unit vectors
    (d.weight * sum(terms.values())).backward()
    assert_only_student_learns(student, d, teacher, scale_learns=False)


def test_identical_embeddings_give_zero():
    student, inputs, teacher = case(s_dim=4, t_dim=4)
    s = student(*inputs)
    d = built(ClipFD(), student, inputs, s)
    assert all(v.item() == pytest.approx(0.0, abs=1e-12) for v in d(s, s, {}).values())


def test_yaml():
    d = from_yaml("clip_fd")
    assert isinstance(d, ClipFD) and d.weight == 4.0


def test_transfer_rows_text_term_over_captioned_pairs_image_term_over_every_image():
    student, inputs, teacher = case(s_dim=4, t_dim=4)
    d = built(ClipFD(), student, inputs, teacher)
    s = student(*inputs)
    keep = torch.tensor([True, False, False, True, True, False])
    terms = d(s, teacher, {"captioned": keep})
    assert terms["image"].item() == pytest.approx(fd_by_loops(s.embedding, teacher.embedding), rel=1e-6)
    assert terms["text"].item() == pytest.approx(
        fd_by_loops(s.features["text_embedding"][keep], teacher.features["text_embedding"][keep]), rel=1e-6)
