import math

import pytest
import torch

from kdkit.distillers.clip_icl import ClipICL

from .clip_helpers import assert_only_student_learns, built, case
from .helpers import from_yaml


def infonce_by_loops(rows, columns, scale) -> float:
    """-1/B sum_i log( exp(s r_i.c_i) / sum_j exp(s r_i.c_j) )."""
    rows, columns = rows.tolist(), columns.tolist()
    total = 0.0
    for i, r in enumerate(rows):
        logits = [scale * sum(a * b for a, b in zip(r, c)) for c in columns]
        total += math.log(sum(math.exp(v) for v in logits)) - logits[i]
    return total / len(rows)


def test_student_rows_against_teacher_columns_by_loops():
    student, inputs, teacher = case(s_dim=4, t_dim=4)
    d = built(ClipICL(init_temperature=0.1), student, inputs, teacher)
    s = student(*inputs)
    loss = d(s, teacher, {})["loss"]
    expected = (infonce_by_loops(s.embedding, teacher.features["text_embedding"], 10.0)
                + infonce_by_loops(s.features["text_embedding"], teacher.embedding, 10.0)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_projection_scale_and_gradients():
    student, inputs, teacher = case(s_dim=3, t_dim=4)
    d = built(ClipICL(), student, inputs, teacher)
    assert d.log_scale.exp().item() == pytest.approx(1 / 0.07)
    s = student(*inputs)
    loss = d(s, teacher, {})["loss"]
    p_img = torch.nn.functional.normalize(d.image_proj.proj(s.embedding), dim=-1)
    p_txt = torch.nn.functional.normalize(d.text_proj.proj(s.features["text_embedding"]), dim=-1)
    expected = (infonce_by_loops(p_img, teacher.features["text_embedding"], 1 / 0.07)
                + infonce_by_loops(p_txt, teacher.embedding, 1 / 0.07)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    # ICL uses its own scale, not the student's CLIP logit scale
    assert_only_student_learns(student, d, teacher, scale_learns=False)


def test_scale_is_clamped():
    student, inputs, teacher = case(s_dim=4, t_dim=4)
    d = built(ClipICL(init_temperature=0.001, max_scale=5.0), student, inputs, teacher)
    s = student(*inputs)
    expected = (infonce_by_loops(s.embedding, teacher.features["text_embedding"], 5.0)
                + infonce_by_loops(s.features["text_embedding"], teacher.embedding, 5.0)) / 2
    assert d(s, teacher, {})["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_yaml():
    d = from_yaml("clip_icl")
    assert isinstance(d, ClipICL) and d.weight == 1.0 and d.max_scale == 100.0


def test_transfer_rows_run_over_the_captioned_pairs_alone():
    student, inputs, teacher = case(s_dim=4, t_dim=4)
    d = built(ClipICL(init_temperature=0.1), student, inputs, teacher)
    s = student(*inputs)
    k = torch.tensor([False, True, True, False, True, True])
    loss = d(s, teacher, {"captioned": k})["loss"]
    expected = (infonce_by_loops(s.embedding[k], teacher.features["text_embedding"][k], 10.0)
                + infonce_by_loops(s.features["text_embedding"][k], teacher.embedding[k], 10.0)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
