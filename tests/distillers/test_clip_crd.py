import math

import pytest
import torch

from kdkit.distillers.affinity import Affinity
from kdkit.distillers.clip_crd import ClipCRD

from .clip_helpers import assert_only_student_learns, case, clip_outputs
from .helpers import from_yaml


def softmax_rows(rows, columns, scale):
    out = []
    for r in rows.tolist():
        logits = [scale * sum(a * b for a, b in zip(r, c)) for c in columns.tolist()]
        z = sum(math.exp(v) for v in logits)
        out.append([math.exp(v) / z for v in logits])
    return out


def kl_by_loops(s_rows, s_cols, s_scale, t_rows, t_cols, t_scale) -> float:
    """1/B sum_i sum_j p_T(j|i) log(p_T(j|i) / p_S(j|i))."""
    p_s, p_t = softmax_rows(s_rows, s_cols, s_scale), softmax_rows(t_rows, t_cols, t_scale)
    return sum(pt * math.log(pt / ps) for rs, rt in zip(p_s, p_t) for ps, pt in zip(rs, rt)) / len(p_s)


def test_kl_both_directions_by_loops():
    student, inputs, teacher = case(s_dim=3, t_dim=4)  # relational: widths may differ freely
    s = student(*inputs)
    terms = ClipCRD()(s, teacher, {})
    s_img, s_txt, s_scale = s.embedding, s.features["text_embedding"], s.features["logit_scale"].item()
    t_img, t_txt = teacher.embedding, teacher.features["text_embedding"]
    assert terms["i2t"].item() == pytest.approx(kl_by_loops(s_img, s_txt, s_scale, t_img, t_txt, 20.0), rel=1e-5)
    assert terms["t2i"].item() == pytest.approx(kl_by_loops(s_txt, s_img, s_scale, t_txt, t_img, 20.0), rel=1e-5)


def test_zero_when_student_equals_teacher():
    student, inputs, _ = case()
    s = student(*inputs)
    twin = clip_outputs(s.embedding.detach(), s.features["text_embedding"].detach(),
                        s.features["logit_scale"].detach())
    assert all(v.item() == pytest.approx(0.0, abs=1e-6) for v in ClipCRD()(s, twin, {}).values())


def test_gradients_reach_the_student_and_its_scale():
    student, inputs, teacher = case()
    d = ClipCRD()
    sum(d(student(*inputs), teacher, {}).values()).backward()
    assert_only_student_learns(student, d, teacher, scale_learns=True)


def test_same_gradient_as_tinyclip_affinity_value_differs_by_teacher_entropy():
    student, inputs, teacher = case()
    grads, values = [], []
    for d in (ClipCRD(), Affinity()):
        student.zero_grad()
        terms = d(student(*inputs), teacher, {})
        sum(terms.values()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
        values.append(terms["i2t"].item())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    p_t = softmax_rows(teacher.embedding, teacher.features["text_embedding"], 20.0)
    entropy = -sum(p * math.log(p) for row in p_t for p in row) / len(p_t)
    assert values[1] - values[0] == pytest.approx(entropy, rel=1e-5)


def test_yaml():
    d = from_yaml("clip_crd")
    assert isinstance(d, ClipCRD) and d.weight == 0.5


CAPTIONED = torch.tensor([True, False, True, True, False, True])


def test_transfer_rows_uncaptioned_images_learn_the_teachers_caption_distribution():
    """On transfer data every image is an i2t row over the real captions only; only captioned
    texts are t2i rows, over every image (CRD and TinyCLIP's affinity alike)."""
    student, inputs, teacher = case(s_dim=3, t_dim=4)
    s = student(*inputs)
    terms = ClipCRD()(s, teacher, {"captioned": CAPTIONED})
    s_img, s_txt, s_scale = s.embedding, s.features["text_embedding"], s.features["logit_scale"].item()
    t_img, t_txt = teacher.embedding, teacher.features["text_embedding"]
    k = CAPTIONED
    assert terms["i2t"].item() == pytest.approx(kl_by_loops(s_img, s_txt[k], s_scale, t_img, t_txt[k], 20.0), rel=1e-5)
    assert terms["t2i"].item() == pytest.approx(kl_by_loops(s_txt[k], s_img, s_scale, t_txt[k], t_img, 20.0), rel=1e-5)
    # the uncaptioned images are taught (gradient through their i2t rows), their padding texts not
    loss = sum(terms.values())
    img_grad, txt_grad = torch.autograd.grad(loss, [s.embedding, s.features["text_embedding"]])
    assert torch.all(img_grad[~k].abs().sum(-1) > 0) and torch.all(txt_grad[~k] == 0)
    affinity = Affinity()(s, teacher, {"captioned": CAPTIONED})
    assert affinity["i2t"].item() > terms["i2t"].item()  # + the teacher's entropy, same rows
