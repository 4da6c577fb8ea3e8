"""PairDistill: KL between the teacher's and the student's preference within each passage pair."""

import math

import pytest
import torch

from kdkit.distillers.group_scores import group_scores
from kdkit.distillers.pairdistill import PairDistill, pairwise_kl
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

from .helpers import from_yaml
from .test_embed import TextPair


def by_loops(s, t, tau, tau_t):
    """mean over queries i and pairs j < k of KL([p, 1 - p] || [q, 1 - q]), p / q the teacher's /
    student's softmax of the pair's two scores."""
    s, t, terms = s.tolist(), t.tolist(), []
    for i in range(len(s)):
        for j in range(len(s[i])):
            for k in range(j + 1, len(s[i])):
                q = math.exp(s[i][j] / tau) / (math.exp(s[i][j] / tau) + math.exp(s[i][k] / tau))
                p = math.exp(t[i][j] / tau_t) / (math.exp(t[i][j] / tau_t) + math.exp(t[i][k] / tau_t))
                terms.append(p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q)))
    return sum(terms) / len(terms)


def test_one_pair_by_hand():
    # student scores (1, 0): P_s = e / (e + 1); teacher (ln 3, 0): P_t = 3/4
    ps = math.e / (math.e + 1)
    expected = 0.75 * math.log(0.75 / ps) + 0.25 * math.log(0.25 / (1 - ps))
    got = pairwise_kl(torch.tensor([[1.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]]), 1.0)
    assert got.item() == pytest.approx(expected, abs=1e-7)
    # the pair's order does not matter: KL of the swapped two-point distributions is the same
    swapped = pairwise_kl(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, math.log(3.0)]]), 1.0)
    assert swapped.item() == pytest.approx(expected, abs=1e-7)


def test_every_pair_of_every_group_and_only_score_differences():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 4, generator=g), 3 * torch.randn(3, 4, generator=g)
    assert pairwise_kl(s, t, 0.5, 2.0).item() == pytest.approx(by_loops(s, t, 0.5, 2.0), rel=1e-5)
    # a per-query offset on either side changes no preference
    shifted = pairwise_kl(s + torch.randn(3, 1, generator=g), t - 7.0, 0.5, 2.0)
    assert shifted.item() == pytest.approx(pairwise_kl(s, t, 0.5, 2.0).item(), rel=1e-5)
    assert pairwise_kl(t, t, 0.7).item() == pytest.approx(0.0, abs=1e-6)
    # very confident teachers (P_t -> 0 or 1) stay finite: log P from logsigmoid
    assert torch.isfinite(pairwise_kl(s, 1e4 * t, 1.0))


def test_bi_encoder_teacher_reads_embeddings_scorer_teacher_its_pair_scores():
    g = torch.Generator().manual_seed(1)
    sq, sp = torch.randn(2, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    tq, tp = torch.randn(2, 6, generator=g), torch.randn(2, 3, 6, generator=g)  # widths may differ
    student = Outputs(features={"query": sq, "passage": sp})
    s = group_scores(sq, sp)
    d = PairDistill(temperature=0.5, teacher_temperature=1.5)
    got = d(student, Outputs(features={"query": tq, "passage": tp}), {})["loss"]
    assert got.item() == pytest.approx(by_loops(s, group_scores(tq, tp), 0.5, 1.5), rel=1e-5)
    scores = torch.tensor([[3.0, 1.0, 2.5], [0.0, -1.0, 0.5]])  # a cross-encoder's (q, p) logits
    got = d(student, Outputs(features={"scores": scores, "query": tq, "passage": tp}), {})["loss"]
    assert got.item() == pytest.approx(by_loops(s, scores, 0.5, 1.5), rel=1e-5)


def test_gradients_reach_only_the_student():
    pair = TextPair(student_width=16, teacher_width=24)
    PairDistill()(pair.student_outputs(), pair.teacher_outputs(), {})["loss"].backward()
    pair.assert_only_student_learns()


def test_yaml_and_errors():
    d = from_yaml("pairdistill")
    assert isinstance(d, PairDistill) and d.weight == 1.0 and d.temperature == 0.05 and d.teacher_temperature is None
    with pytest.raises(KdkitError, match="> 0"):
        PairDistill(teacher_temperature=0)
    one = Outputs(features={"query": torch.ones(2, 3), "passage": torch.ones(2, 1, 3)})
    with pytest.raises(KdkitError, match=">= 2 passages"):
        d(one, one, {})
    with pytest.raises(KdkitError, match="must match"):
        d(Outputs(features={"query": torch.ones(2, 3), "passage": torch.ones(2, 2, 3)}),
          Outputs(features={"scores": torch.ones(2, 3)}), {})
    with pytest.raises(KdkitError, match="feature 'passage'"):
        d(Outputs(features={"query": torch.ones(2, 3)}), one, {})
