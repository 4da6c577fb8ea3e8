"""Embed (LEAF): 1 - cos / squared L2 to the teacher's embedding of the same text."""

import math

import pytest
import torch

from kdkit.distillers.embed import Embed, embedding_loss
from kdkit.errors import KdkitError
from kdkit.models.text import hf_encoder
from kdkit.outputs import Outputs
from kdkit.teacher import FrozenTeacher

from .helpers import from_yaml

QUERIES = ["stem cells heal hearts", "vitamin d and bones"]
PASSAGES = ["cardiac repair by stem cells", "a study of bones", "gene therapy", "vitamin d trial",
            "lung cancer", "fracture risk in women"]


def tiny_encoder(seed: int, width: int = 16):
    torch.manual_seed(seed)
    config = dict(model_type="bert", vocab_size=30522, hidden_size=width, num_hidden_layers=1,
                  num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    return hf_encoder(config=config, pretrained=False, max_length=16)


class TextPair:
    """A trainable tiny student and a frozen tiny teacher, giving the retrieval task's Outputs:
    features text [B, D], query [B, D], passage [B, G, D] (positive first)."""

    def __init__(self, student_width: int = 16, teacher_width: int = 16):
        self.student = tiny_encoder(0, student_width).train()
        self.teacher = FrozenTeacher(tiny_encoder(1, teacher_width))

    def _outputs(self, model) -> Outputs:
        q = model(**self._tok(QUERIES))
        p = model(**self._tok(PASSAGES)).reshape(len(QUERIES), -1, q.shape[-1])
        t = model(**self._tok(PASSAGES[:4]))
        return Outputs(embedding=t, features={"text": t, "query": q, "passage": p})

    def _tok(self, texts):
        return self.student.tokenize(texts)

    def student_outputs(self) -> Outputs:
        return self._outputs(self.student)

    def teacher_outputs(self) -> Outputs:
        return self._outputs(self.teacher)

    def assert_only_student_learns(self) -> None:
        params = dict(self.student.named_parameters())
        reached = [n for n, p in params.items() if p.grad is not None and p.grad.abs().sum() > 0]
        assert any(n.startswith("backbone.encoder.layer.0") for n in reached)
        assert "backbone.embeddings.word_embeddings.weight" in reached
        for name, p in self.teacher.named_parameters():
            assert not p.requires_grad and p.grad is None, f"teacher {name} must not learn"


def test_values_by_hand():
    s = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    t = torch.tensor([[4.0, 3.0], [0.0, 2.0]])
    # cos = 24/25 and 0: mean(1 - cos) = (1/25 + 1) / 2; squared L2: (1 + 1) and (1 + 4).
    assert embedding_loss(s, t, "cosine").item() == pytest.approx((1 / 25 + 1) / 2)
    assert embedding_loss(s, t, "mse").item() == pytest.approx((2 + 5) / 2)
    u = torch.nn.functional.normalize(torch.randn(5, 7), dim=1)
    v = torch.nn.functional.normalize(torch.randn(5, 7), dim=1)
    # unit vectors: ||u - v||^2 = 2 (1 - cos)
    assert embedding_loss(u, v, "mse").item() == pytest.approx(2 * embedding_loss(u, v, "cosine").item(), rel=1e-5)


def test_loops_over_every_field_and_row():
    g = torch.Generator().manual_seed(0)
    s = {"text": torch.randn(3, 4, generator=g), "query": torch.randn(2, 4, generator=g),
         "passage": torch.randn(2, 3, 4, generator=g)}
    t = {k: torch.randn(v.shape, generator=g) for k, v in s.items()}
    rows = [(a, b) for k in ("text", "query", "passage") for a, b in zip(s[k].reshape(-1, 4), t[k].reshape(-1, 4))]
    by_hand = sum(1 - sum(x * y for x, y in zip(a.tolist(), b.tolist()))
                  / math.sqrt(sum(x * x for x in a.tolist()) * sum(y * y for y in b.tolist())) for a, b in rows)
    d = Embed()
    got = d(Outputs(features=s), Outputs(features=t), {})["loss"]
    assert got.item() == pytest.approx(by_hand / len(rows), rel=1e-5)
    only_text = Embed(fields=["text"])(Outputs(features=s), Outputs(features=t), {})["loss"]
    assert only_text.item() == pytest.approx(embedding_loss(s["text"], t["text"]).item())
    assert d(Outputs(features=t), Outputs(features=t), {})["loss"].item() == pytest.approx(0, abs=1e-6)


def test_gradients_reach_only_the_student():
    pair = TextPair()
    d = Embed(loss="mse")
    terms = d(pair.student_outputs(), pair.teacher_outputs(), {})
    terms["loss"].backward()
    pair.assert_only_student_learns()


def test_yaml_and_errors():
    d = from_yaml("embed")
    assert isinstance(d, Embed) and d.loss == "cosine" and d.fields is None and d.weight == 1.0 and not d.project
    pair = TextPair(student_width=16, teacher_width=24)
    with pytest.raises(KdkitError, match=r"\(16,\).*\(24,\).*projection_dim"):
        d.build(pair.student_outputs(), pair.teacher_outputs(), None)
    with pytest.raises(KdkitError, match="cosine, mse"):
        Embed(loss="l1")
    with pytest.raises(KdkitError, match="unknown"):
        Embed(fields=["doc"])
    with pytest.raises(KdkitError, match="lacks"):
        Embed(fields=["query"])(Outputs(features={"text": torch.ones(1, 2)}),
                                Outputs(features={"text": torch.ones(1, 2)}), {})


def test_projection_for_a_compact_student_value_and_gradients():
    """project=true: a narrower student is compared through a learned Linear(D_s, D_t) (LEALLA)."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 2, generator=g), torch.randn(3, 4, generator=g)
    d = Embed(project=True, fields=["text"])
    d.build(Outputs(features={"text": s}), Outputs(features={"text": t}), None)
    assert (d.projection.in_features, d.projection.out_features) == (2, 4)
    w, b = d.projection.weight.detach(), d.projection.bias.detach()
    z = [[w[o, 0].item() * x[0] + w[o, 1].item() * x[1] + b[o].item() for o in range(4)] for x in s.tolist()]
    by_hand = sum(1 - sum(p * q for p, q in zip(a, c)) / math.sqrt(sum(p * p for p in a) * sum(q * q for q in c))
                  for a, c in zip(z, t.tolist())) / 3
    got = d(Outputs(features={"text": s}), Outputs(features={"text": t}), {})["loss"]
    assert got.item() == pytest.approx(by_hand, rel=1e-5)

    pair = TextPair(student_width=16, teacher_width=24)
    d = Embed(project=True)
    d.build(pair.student_outputs(), pair.teacher_outputs(), None)
    d(pair.student_outputs(), pair.teacher_outputs(), {})["loss"].backward()
    pair.assert_only_student_learns()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.projection.parameters())
    # equal widths: nothing to learn, the plain LEAF loss
    same = TextPair()
    d = Embed(project=True)
    d.build(same.student_outputs(), same.teacher_outputs(), None)
    assert d.projection is None and not list(d.parameters())
    with pytest.raises(KdkitError, match=r"projection_dim.*embed.project=true"):
        Embed().build(pair.student_outputs(), pair.teacher_outputs(), None)
