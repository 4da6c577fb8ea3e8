"""MultiExit: lower exits learn from the (detached) exits above them, the top exit from the teacher."""

import math

import pytest
import torch

from kdkit.distillers.base import DistillContext
from kdkit.distillers.multi_exit import MultiExit
from kdkit.errors import KdkitError
from kdkit.models.text import hf_encoder
from kdkit.outputs import Outputs
from kdkit.teacher import FrozenTeacher

from .helpers import from_yaml

QUERIES = ["stem cells heal hearts", "vitamin d and bones"]
PASSAGES = ["cardiac repair by stem cells", "a study of bones", "gene therapy", "vitamin d trial",
            "lung cancer", "fracture risk in women"]


def fake_outputs(seed: int, exits=(0, 1), b: int = 2, g: int = 3, d: int = 4) -> Outputs:
    gen = torch.Generator().manual_seed(seed)
    feats = {}
    for suffix in ["", *[f"@{k}" for k in exits]]:
        feats["text" + suffix] = torch.randn(3, d, generator=gen)
        feats["query" + suffix] = torch.randn(b, d, generator=gen)
        feats["passage" + suffix] = torch.randn(b, g, d, generator=gen)
    return Outputs(embedding=feats["text"], features=feats)


def rows(out: Outputs, suffix: str) -> list[list[float]]:
    return [r for f in ("text", "query", "passage") for r in out.features[f + suffix].reshape(-1, 4).tolist()]


def one_minus_cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return 1 - dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def mean_one_minus_cos(s_rows, t_rows) -> float:
    return sum(one_minus_cos(a, b) for a, b in zip(s_rows, t_rows)) / len(s_rows)


@pytest.mark.parametrize("target", ["top", "above"])
def test_cosine_terms_by_hand(target):
    s, t = fake_outputs(0), fake_outputs(1, exits=())
    terms = MultiExit(exits=[1, 0], target=target, teacher_weight=0.5)(s, t, {})
    assert set(terms) == {"teacher", "exit0", "exit1"}
    assert terms["teacher"].item() == pytest.approx(0.5 * mean_one_minus_cos(rows(s, ""), rows(t, "")), rel=1e-5)
    assert terms["exit1"].item() == pytest.approx(mean_one_minus_cos(rows(s, "@1"), rows(s, "")), rel=1e-5)
    above = "" if target == "top" else "@1"
    assert terms["exit0"].item() == pytest.approx(mean_one_minus_cos(rows(s, "@0"), rows(s, above)), rel=1e-5)
    assert "teacher" not in MultiExit(exits=[0], teacher_weight=0)(s, t, {})


def listwise_by_hand(sq, sp, tq, tp, tau: float) -> float:
    """mean_i sum_j p_t(j|i) (log p_t(j|i) - log p_s(j|i)), over every passage of the batch."""
    s_all, t_all = sp.reshape(-1, sp.shape[-1]).tolist(), tp.reshape(-1, tp.shape[-1]).tolist()
    total = 0.0
    for qs, qt in zip(sq.tolist(), tq.tolist()):
        ss = [sum(a * b for a, b in zip(qs, p)) / tau for p in s_all]
        ts = [sum(a * b for a, b in zip(qt, p)) / tau for p in t_all]
        log_zs, log_zt = math.log(sum(map(math.exp, ss))), math.log(sum(map(math.exp, ts)))
        total += sum(math.exp(t - log_zt) * ((t - log_zt) - (s - log_zs)) for s, t in zip(ss, ts))
    return total / len(sq)


def test_listwise_terms_by_hand():
    s, t = fake_outputs(2), fake_outputs(3, exits=())
    f = s.features
    terms = MultiExit(exits=[0, 1], loss="listwise", target="above", temperature=0.5)(s, t, {})
    assert terms["teacher"].item() == pytest.approx(
        listwise_by_hand(f["query"], f["passage"], t.features["query"], t.features["passage"], 0.5), rel=1e-5)
    assert terms["exit0"].item() == pytest.approx(
        listwise_by_hand(f["query@0"], f["passage@0"], f["query@1"], f["passage@1"], 0.5), rel=1e-5)
    assert terms["exit1"].item() == pytest.approx(
        listwise_by_hand(f["query@1"], f["passage@1"], f["query"], f["passage"], 0.5), rel=1e-5)


def tiny(seed: int, layers: int):
    torch.manual_seed(seed)
    config = dict(model_type="bert", vocab_size=30522, hidden_size=16, num_hidden_layers=layers,
                  num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    return hf_encoder(config=config, pretrained=False, max_length=16)


def exit_outputs(model, exits) -> Outputs:
    q, p = model.tokenize(QUERIES), model.tokenize(PASSAGES)
    q_top, q_exits = model.forward_exits(q["input_ids"], q["attention_mask"], exits)
    p_top, p_exits = model.forward_exits(p["input_ids"], p["attention_mask"], exits)
    feats = {"query": q_top, "passage": p_top.reshape(2, 3, -1)}
    for k in exits:
        feats[f"query@{k}"], feats[f"passage@{k}"] = q_exits[k], p_exits[k].reshape(2, 3, -1)
    return Outputs(embedding=q_top, features=feats)


def block_grads(model) -> dict[int, float]:
    out = {}
    for name, p in model.named_parameters():
        if name.startswith("backbone.encoder.layer."):
            k = int(name.split(".")[3])
            out[k] = out.get(k, 0.0) + (0.0 if p.grad is None else p.grad.abs().sum().item())
    return out


@pytest.mark.parametrize("loss", ["cosine", "listwise"])
def test_lower_exit_terms_never_reach_the_blocks_above(loss):
    """Exit 0 learns from exit 1 (target: above), exit 1 from the top: exit 0's term gives
    block 0 a gradient and blocks 1-2 none (its target is detached); the top exit's term
    against the teacher reaches every block; the frozen teacher gets nothing."""
    student, teacher = tiny(0, 3).train(), FrozenTeacher(tiny(1, 3))
    distiller = MultiExit(exits=[0, 1], loss=loss, target="above")
    s = exit_outputs(student, [0, 1])
    with torch.no_grad():
        t = exit_outputs(teacher.model, [])
    distiller.build(s, t, DistillContext(models={"student": student, "teacher": teacher.model}))
    terms = distiller(s, t, {})
    terms["exit0"].backward(retain_graph=True)
    grads = block_grads(student)
    assert grads[0] > 0 and grads[1] == 0 and grads[2] == 0
    student.zero_grad()
    terms["exit1"].backward(retain_graph=True)
    grads = block_grads(student)
    assert grads[0] > 0 and grads[1] > 0 and grads[2] == 0
    student.zero_grad()
    terms["teacher"].backward()
    assert all(v > 0 for v in block_grads(student).values())
    assert all(not p.requires_grad and p.grad is None for p in teacher.model.parameters())


def test_clear_errors_and_yaml_defaults():
    d = from_yaml("multi_exit")
    assert (d.exits, d.loss, d.target, d.teacher_weight, d.weight) == ([0], "cosine", "top", 1.0, 1.0)
    assert d.student_features == ["text@0", "query@0", "passage@0"] and d.teacher_features == []
    s, t = fake_outputs(0, exits=(0,)), fake_outputs(1, exits=())
    with pytest.raises(KdkitError, match="top exit"):
        MultiExit(exits=[0, 1]).build(s, t, DistillContext(models={"student": tiny(0, 2)}))
    text_only = Outputs(features={"text": s.features["text"], "text@0": s.features["text@0"]})
    with pytest.raises(KdkitError, match="stream=tuples or both"):
        MultiExit(loss="listwise").build(text_only, text_only, DistillContext())
    for bad in (dict(loss="kl"), dict(target="below"), dict(exits=[]), dict(fields=["title"])):
        with pytest.raises(KdkitError):
            MultiExit(**bad)
