"""Matryoshka: distillation losses at truncated, re-normalised student prefixes."""

import math

import pytest
import torch

from kdkit.distillers.matryoshka import Matryoshka, similarity_matrix_loss, truncate
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

from .helpers import from_yaml
from .test_embed import TextPair


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _outputs(rows):
    return Outputs(features={"text": rows})


def test_similarity_terms_equal_loops_over_pairs():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 8, generator=g), torch.randn(5, 6, generator=g)
    d = Matryoshka(dims=[8, 4, 2], dim_weights=[1.0, 0.5, 2.0])
    got = d(_outputs(s), _outputs(t), {})
    assert set(got) == {"d8", "d4", "d2"}
    for dim, w in ((8, 1.0), (4, 0.5), (2, 2.0)):
        pairs = [(_cos(s[i, :dim].tolist(), s[j, :dim].tolist()) - _cos(t[i].tolist(), t[j].tolist())) ** 2
                 for i in range(5) for j in range(5) if i != j]
        assert got[f"d{dim}"].item() == pytest.approx(w * sum(pairs) / len(pairs), rel=1e-5)


def test_similarity_reads_only_relations():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))  # a rotation of the teacher's space
    assert similarity_matrix_loss(s, t @ q).item() == pytest.approx(similarity_matrix_loss(s, t).item(), rel=1e-5)
    assert similarity_matrix_loss(3 * t, t).item() == pytest.approx(0, abs=1e-6)
    # a student equal to the teacher loses nothing at full width, but does at its prefixes
    got = Matryoshka(dims=[8, 2])(_outputs(t), _outputs(t), {})
    assert got["d8"].item() == pytest.approx(0, abs=1e-6) and got["d2"].item() > 1e-3


def test_truncate_renormalises_the_prefix():
    x = torch.tensor([[3.0, 4.0, 12.0], [0.0, 2.0, 1.0]])
    assert torch.allclose(truncate(x, 2), torch.tensor([[0.6, 0.8], [0.0, 1.0]]))


def test_prefix_target_compares_with_the_teachers_prefix():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    got = Matryoshka(dims=[8, 3], target="prefix")(_outputs(s), _outputs(t), {})
    for dim in (8, 3):
        by_hand = sum(1 - _cos(s[i, :dim].tolist(), t[i, :dim].tolist()) for i in range(4)) / 4
        assert got[f"d{dim}"].item() == pytest.approx(by_hand, rel=1e-5)
    mse = Matryoshka(dims=[3], target="prefix", loss="mse")(_outputs(s), _outputs(t), {})["d3"]
    # unit vectors on both sides: ||u - v||^2 = 2 (1 - cos)
    assert mse.item() == pytest.approx(2 * got["d3"].item(), rel=1e-5)


def test_projection_target_value_and_gradients():
    pair = TextPair(student_width=16, teacher_width=24)
    d = Matryoshka(dims=[16, 8], target="projection")
    s_out, t_out = pair.student_outputs(), pair.teacher_outputs()
    d.build(s_out, t_out, None)
    assert {k: (m.in_features, m.out_features) for k, m in d.projections.items()} == {"d16": (16, 24), "d8": (8, 24)}
    terms = d(s_out, t_out, {})
    rows = torch.cat([s_out.features[f].reshape(-1, 16) for f in ("text", "query", "passage")]).detach()
    t_rows = torch.cat([t_out.features[f].reshape(-1, 24) for f in ("text", "query", "passage")])
    for dim in (16, 8):
        lin = d.projections[f"d{dim}"]
        w, b = lin.weight.detach(), lin.bias.detach()
        by_hand = []
        for x, y in zip(rows.tolist(), t_rows.tolist()):
            p = [v / math.sqrt(sum(u * u for u in x[:dim])) for v in x[:dim]]
            z = [sum(w[o, k].item() * p[k] for k in range(dim)) + b[o].item() for o in range(24)]
            by_hand.append(1 - _cos(z, y))
        assert terms[f"d{dim}"].item() == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-4)
    sum(terms.values()).backward()
    pair.assert_only_student_learns()
    for name, p in d.projections.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # equal widths: no adapter where d is the teacher's width
    same = Matryoshka(dims=[16, 4], target="projection")
    same.build(pair.student_outputs(), TextPair(16, 16).teacher_outputs(), None)
    assert list(same.projections) == ["d4"]


def test_similarity_gradients_reach_only_the_student_in_bf16():
    pair = TextPair(student_width=16, teacher_width=24)
    d = Matryoshka(dims=[16, 8, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = d(pair.student_outputs(), pair.teacher_outputs(), {})
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    pair.assert_only_student_learns()
    assert not list(d.parameters())


def test_yaml_and_errors():
    d = from_yaml("matryoshka")
    assert isinstance(d, Matryoshka) and d.dims == [384, 256, 128, 64] and d.dim_weights == [1.0] * 4
    assert (d.target, d.loss, d.fields, d.weight) == ("similarity", "cosine", None, 1.0)
    pair = TextPair(student_width=16, teacher_width=8)
    with pytest.raises(KdkitError, match=r"student's embeddings have 16 .*<= 16"):
        d.build(pair.student_outputs(), pair.teacher_outputs(), None)
    with pytest.raises(KdkitError, match="exceed the teacher's 8"):
        Matryoshka(dims=[16], target="prefix").build(pair.student_outputs(), pair.teacher_outputs(), None)
    for bad in ([], [64, 0], [64, 64], [32.5]):
        with pytest.raises(KdkitError, match="distinct positive integers"):
            Matryoshka(dims=bad)
    with pytest.raises(KdkitError, match="2 entries for 3 dims"):
        Matryoshka(dims=[8, 4, 2], dim_weights=[1, 1])
    with pytest.raises(KdkitError, match="similarity, projection, prefix"):
        Matryoshka(target="pca")
    with pytest.raises(KdkitError, match="unknown"):
        Matryoshka(fields=["doc"])
    with pytest.raises(KdkitError, match="at least 2 texts"):
        Matryoshka(dims=[2])(_outputs(torch.ones(1, 4)), _outputs(torch.ones(1, 4)), {})
