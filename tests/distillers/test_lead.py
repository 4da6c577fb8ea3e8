"""LEAD: per drawn (student, teacher) layer pair, KL of in-batch score distributions, re-weighted
by the teacher layers' NLL at the positives."""

import math

import pytest
import torch

from kdkit.distillers.base import DistillContext
from kdkit.distillers.lead import Lead, pick_layers
from kdkit.errors import KdkitError
from kdkit.models.text import hf_encoder
from kdkit.outputs import Outputs
from kdkit.tasks.retrieval_layers import layer_outputs, requests
from kdkit.teacher import FrozenTeacher

from .helpers import from_yaml

B, G, D = 2, 3, 4


def layered(seed: int, layers: int) -> Outputs:
    gen = torch.Generator().manual_seed(seed)
    feats = {"query": torch.randn(B, D, generator=gen), "passage": torch.randn(B, G, D, generator=gen)}
    for k in range(layers):
        feats[f"query@{k}"] = torch.randn(B, D, generator=gen)
        feats[f"passage@{k}"] = torch.randn(B, G, D, generator=gen)
    return Outputs(embedding=feats["query"], features=feats)


def log_softmax_rows(q, p, tau):
    """Per query, log softmax over every passage row of the batch, by loops."""
    out = []
    for qi in q.tolist():
        scores = [sum(a * b for a, b in zip(qi, pj)) / tau for pj in p.reshape(-1, D).tolist()]
        log_z = math.log(sum(math.exp(x) for x in scores))
        out.append([x - log_z for x in scores])
    return out


def by_hand(s: Outputs, t: Outputs, pairs, tau, tau_t, layer_tau, reweight=True) -> float:
    kls, nlls = [], []
    for ls, lt in pairs:
        log_s = log_softmax_rows(s.features[f"query@{ls}"], s.features[f"passage@{ls}"], tau)
        log_t = log_softmax_rows(t.features[f"query@{lt}"], t.features[f"passage@{lt}"], tau_t)
        kls.append(sum(sum(math.exp(b) * (b - a) for a, b in zip(rs, rt)) for rs, rt in zip(log_s, log_t)) / B)
        nlls.append(-sum(log_t[i][i * G] for i in range(B)) / B)  # positive of query i: its group's first
    if not reweight:
        return sum(kls) / len(kls)
    z = sum(math.exp(-n / layer_tau) for n in nlls)
    return sum(math.exp(-n / layer_tau) / z * kl for n, kl in zip(nlls, kls))


@pytest.mark.parametrize("reweight", [True, False])
def test_value_by_loops(reweight):
    s, t = layered(0, 3), layered(1, 4)
    d = Lead(num_layers=2, temperature=0.5, teacher_temperature=0.25, layer_temperature=2.0, reweight=reweight,
             resample_every=10, seed=3)
    d.set_progress(0, 25)
    s_sel, t_sel = d.draw([0, 1, 2], [0, 1, 2, 3])
    got = d(s, t, {})["loss"].item()
    assert got == pytest.approx(by_hand(s, t, list(zip(s_sel, t_sel)), 0.5, 0.25, 2.0, reweight), rel=1e-5)
    assert 0 < got


def test_layer_draws_are_seeded_sorted_and_change_every_period():
    d = Lead(num_layers=2, resample_every=5, seed=7)
    draws = []
    for step in range(0, 60, 5):
        d.set_progress(0, step)
        first = d.draw(range(6), range(12))
        d.set_progress(0, step + 4)  # same period: same layers
        assert d.draw(range(6), range(12)) == first
        for layers, n in zip(first, (6, 12)):
            assert layers == sorted(layers) and len(set(layers)) == 2 and all(0 <= k < n for k in layers)
        draws.append(first)
    assert len({str(x) for x in draws}) > 3  # the liberal selection moves around
    again = Lead(num_layers=2, resample_every=5, seed=7)
    again.set_progress(0, 0)
    assert again.draw(range(6), range(12)) == draws[0]  # a restart draws the same
    assert pick_layers([4, 7, 9], 3, torch.Generator().manual_seed(0)) == [4, 7, 9]


def tiny(seed: int, layers: int):
    torch.manual_seed(seed)
    config = dict(model_type="bert", vocab_size=30522, hidden_size=16, num_hidden_layers=layers,
                  num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    return hf_encoder(config=config, pretrained=False, max_length=16)


def tuples_batch(model) -> dict:
    q = model.tokenize(["stem cells heal hearts", "vitamin d and bones"])
    p = model.tokenize(["cardiac repair by stem cells", "a study of bones", "gene therapy", "vitamin d trial",
                        "lung cancer", "fracture risk in women"])
    return {"query_input_ids": q["input_ids"], "query_attention_mask": q["attention_mask"],
            "passage_input_ids": p["input_ids"], "passage_attention_mask": p["attention_mask"]}


def test_gradients_reach_only_the_student_blocks_up_to_the_drawn_layers():
    student, teacher = tiny(0, 3).train(), FrozenTeacher(tiny(1, 4))
    d = Lead(num_layers=1, student_layers=[0, 1], teacher_layers=None)
    assert d.student_features == ["query@0", "query@1", "passage@0", "passage@1"]
    assert d.teacher_features == ["query@*", "passage@*"]
    batch = tuples_batch(student)
    s = layer_outputs(student, batch, requests(d.student_features, 3))
    with torch.no_grad():
        t = layer_outputs(teacher.model, batch, requests(d.teacher_features, 4))
    assert sorted(k for k in t.features if "@" in k) == sorted(f"{f}@{k}" for f in ("query", "passage")
                                                                for k in range(4))
    d.build(s, t, DistillContext())
    d(s, t, batch)["loss"].backward()
    (ls,), _ = d.draw([0, 1], range(4))
    for name, p in student.named_parameters():
        if name.startswith("backbone.encoder.layer."):
            reached = p.grad is not None and p.grad.abs().sum() > 0
            assert reached == (int(name.split(".")[3]) <= ls), name
    assert student.backbone.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in teacher.model.parameters())


def test_clear_errors_and_yaml_defaults():
    d = from_yaml("lead")
    assert (d.num_layers, d.student_layers, d.teacher_layers) == (2, None, None)
    assert (d.reweight, d.resample_every, d.seed) == (True, 100, 0)
    assert d.teacher_temperature == d.temperature == 0.05
    with pytest.raises(KdkitError, match="offers layers"):
        Lead(num_layers=4).build(layered(0, 3), layered(1, 4), DistillContext())
    with pytest.raises(KdkitError, match="stream=tuples or both"):
        Lead().build(Outputs(features={"text": torch.zeros(2, 4)}), layered(1, 4), DistillContext())
    with pytest.raises(KdkitError, match="fewer than num_layers"):
        Lead(num_layers=3, student_layers=[0, 1])
    for bad in (dict(num_layers=0), dict(temperature=0), dict(resample_every=0)):
        with pytest.raises(KdkitError):
            Lead(**bad)
