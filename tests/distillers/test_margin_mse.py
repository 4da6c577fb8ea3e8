"""Margin-MSE: squared difference of score margins (positive minus each negative)."""

import pytest
import torch

from kdkit.distillers.margin_mse import MarginMSE, group_scores, margin_mse
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

from .helpers import from_yaml
from .test_embed import TextPair


def by_loops(sq, sp, tq, tp):
    terms = []
    for i in range(sq.shape[0]):
        dot = lambda q, p: sum(a * b for a, b in zip(q.tolist(), p.tolist()))  # noqa: E731
        s = [dot(sq[i], sp[i, j]) for j in range(sp.shape[1])]
        t = [dot(tq[i], tp[i, j]) for j in range(tp.shape[1])]
        terms += [((s[0] - s[j]) - (t[0] - t[j])) ** 2 for j in range(1, len(s))]
    return sum(terms) / len(terms)


def test_value_by_hand():
    # student scores (2, 1, 0) -> margins (1, 2); teacher (1, 1, -1) -> margins (0, 2)
    sq = torch.tensor([[1.0, 0.0]])
    sp = torch.tensor([[[2.0, 5.0], [1.0, 9.0], [0.0, 7.0]]])
    tq = torch.tensor([[0.0, 1.0]])
    tp = torch.tensor([[[3.0, 1.0], [8.0, 1.0], [0.0, -1.0]]])
    assert torch.equal(group_scores(sq, sp), torch.tensor([[2.0, 1.0, 0.0]]))
    assert margin_mse(sq, sp, tq, tp).item() == pytest.approx(((1 - 0) ** 2 + (2 - 2) ** 2) / 2)


def test_matches_loops_and_ignores_a_score_offset():
    g = torch.Generator().manual_seed(0)
    sq, sp = torch.randn(3, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    tq, tp = torch.randn(3, 6, generator=g), torch.randn(3, 4, 6, generator=g)  # widths may differ
    d = MarginMSE()
    got = d(Outputs(features={"query": sq, "passage": sp}), Outputs(features={"query": tq, "passage": tp}), {})
    assert got["loss"].item() == pytest.approx(by_loops(sq, sp, tq, tp), rel=1e-5)
    # adding c_i * q_i / |q_i|^2 to every passage of group i raises all its scores by c_i: margins stay
    c = torch.randn(3, 1, 1, generator=g)
    shifted = tp + c * (tq / tq.pow(2).sum(1, keepdim=True)).unsqueeze(1)
    assert torch.allclose(group_scores(tq, shifted), group_scores(tq, tp) + c.squeeze(-1), atol=1e-5)
    assert margin_mse(sq, sp, tq, shifted).item() == pytest.approx(margin_mse(sq, sp, tq, tp).item(), rel=1e-4)


def test_gradients_reach_only_the_student():
    pair = TextPair(student_width=16, teacher_width=24)
    MarginMSE()(pair.student_outputs(), pair.teacher_outputs(), {})["loss"].backward()
    pair.assert_only_student_learns()


def test_yaml_and_errors():
    d = from_yaml("margin_mse")
    assert isinstance(d, MarginMSE) and d.weight == 1.0
    one = Outputs(features={"query": torch.ones(2, 3), "passage": torch.ones(2, 1, 3)})
    with pytest.raises(KdkitError, match=">= 1 negative"):
        d(one, one, {})
    with pytest.raises(KdkitError, match="feature 'passage'"):
        d(Outputs(features={"query": torch.ones(2, 3)}), one, {})


def test_a_scorer_teachers_pair_scores_replace_its_embeddings():
    g = torch.Generator().manual_seed(1)
    sq, sp = torch.randn(2, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    scores = torch.tensor([[3.0, 1.0, 2.5], [0.0, -1.0, 0.5]])  # a cross-encoder's (q, p) scores
    got = MarginMSE()(Outputs(features={"query": sq, "passage": sp}), Outputs(features={"scores": scores}), {})
    s = group_scores(sq, sp)
    want = sum(((s[i, 0] - s[i, j]) - (scores[i, 0] - scores[i, j])) ** 2 for i in range(2) for j in (1, 2)) / 4
    assert got["loss"].item() == pytest.approx(want.item(), rel=1e-5)
