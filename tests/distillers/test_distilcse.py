"""DistilCSE (CKD): InfoNCE of student embeddings against the teacher's, queue, projection, ranks."""

import math

import pytest
import torch

import kdkit.distillers.distilcse as distilcse_module
from kdkit.distillers.distilcse import DistilCSE, contrastive_kd
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

from .helpers import from_yaml
from .test_embed import TextPair


def cos(a, b):
    a, b = a.tolist(), b.tolist()
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def by_loops(s, keys, positive, tau, row_ids=None, key_ids=None):
    """-(1/N) sum_i log exp(cos(s_i, k_pos)/tau) / sum_{j allowed} exp(cos(s_i, k_j)/tau)."""
    total = 0.0
    for i in range(len(s)):
        allowed = [j for j in range(len(keys)) if j == positive[i] or row_ids is None or key_ids[j] != row_ids[i]]
        z = sum(math.exp(cos(s[i], keys[j]) / tau) for j in allowed)
        total -= math.log(math.exp(cos(s[i], keys[positive[i]]) / tau) / z)
    return total / len(s)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_value_by_hand():
    # s_0 = t_0 = e1, s_1 = t_1 = e2 at tau = 1: each row scores 1 on its positive, 0 on the other
    e = torch.eye(2)
    expected = -math.log(math.e / (math.e + 1))
    assert contrastive_kd(e, e, torch.arange(2), 1.0).item() == pytest.approx(expected, abs=1e-7)
    d = DistilCSE(temperature=1.0, learn_temperature=False, queue_size=0)
    got = d(Outputs(features={"text": 3 * e}), Outputs(features={"text": e}), {})  # cosine: scale-free
    assert got["loss"].item() == pytest.approx(expected, abs=1e-6) and set(got) == {"loss"}


def test_every_text_of_every_field_against_every_teacher_text():
    s = {"text": rand(3, 4, seed=1), "query": rand(2, 4, seed=2), "passage": rand(2, 3, 4, seed=3)}
    t = {k: rand(*v.shape, seed=10 + i) for i, (k, v) in enumerate(s.items())}
    rows_s = torch.cat([s["text"], s["query"], s["passage"].reshape(-1, 4)])
    rows_t = torch.cat([t["text"], t["query"], t["passage"].reshape(-1, 4)])
    d = DistilCSE(temperature=0.2, learn_temperature=False, queue_size=0, mse_weight=0.5)
    got = d(Outputs(features=s), Outputs(features=t), {})
    assert got["loss"].item() == pytest.approx(by_loops(rows_s, rows_t, list(range(11)), 0.2), rel=1e-5)
    mse = sum(sum((x - y) ** 2 for x, y in zip(a.tolist(), b.tolist())) for a, b in zip(rows_s, rows_t)) / 11
    assert got["mse"].item() == pytest.approx(0.5 * mse, rel=1e-5)
    only_query = DistilCSE(temperature=0.2, learn_temperature=False, queue_size=0, fields=["query"])
    assert only_query(Outputs(features=s), Outputs(features=t), {})["loss"].item() == pytest.approx(
        by_loops(s["query"], t["query"], [0, 1], 0.2), rel=1e-5)


def test_the_same_text_twice_is_not_its_own_negative():
    # passage rows 1 and 2 are the same text (pool id 7): each is only the other's non-negative
    s, t = rand(2, 2, 5, seed=4), rand(2, 2, 5, seed=5)
    t[1, 0] = t[0, 1]
    ids = torch.tensor([[3, 7], [7, 9]])
    d = DistilCSE(temperature=0.1, learn_temperature=False, queue_size=0, fields=["passage"])
    got = d(Outputs(features={"passage": s}), Outputs(features={"passage": t}), {"passage_pool": ids})["loss"]
    rs, rt = s.reshape(4, 5), t.reshape(4, 5)
    assert got.item() == pytest.approx(by_loops(rs, rt, [0, 1, 2, 3], 0.1, [3, 7, 7, 9], [3, 7, 7, 9]), rel=1e-5)
    unmasked = d(Outputs(features={"passage": s}), Outputs(features={"passage": t}), {})["loss"]
    assert unmasked.item() == pytest.approx(by_loops(rs, rt, [0, 1, 2, 3], 0.1), rel=1e-5)
    assert unmasked.item() > got.item()


def test_queue_adds_earlier_teacher_rows_newest_first_and_caps():
    d = DistilCSE(temperature=0.5, learn_temperature=False, queue_size=5, fields=["text"])
    steps = [(rand(3, 4, seed=20 + k), rand(3, 4, seed=30 + k), torch.tensor([3 * k, 3 * k + 1, 3 * k + 2]))
             for k in range(2)]
    steps.append((rand(3, 4, seed=40), rand(3, 4, seed=41), torch.tensor([0, 4, 100])))  # texts 0 and 4 again
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    seen_t, seen_ids = [], []
    d.train()
    for s, t, ids in steps:
        got = d(Outputs(features={"text": s}), Outputs(features={"text": t}), {"text_pool": ids})["loss"]
        keys, key_ids = [*t, *seen_t], [*ids.tolist(), *seen_ids]
        assert got.item() == pytest.approx(by_loops(s, keys, [0, 1, 2], 0.5, ids.tolist(), key_ids), rel=1e-5)
        seen_t, seen_ids = [*t, *seen_t][:5], key_ids[:5]
        assert torch.allclose(d.queue, unit(torch.stack(seen_t)), atol=1e-6)
        assert d.queue_ids.tolist() == seen_ids
    d.eval()  # evaluation never enqueues
    d(Outputs(features={"text": rand(3, 4, seed=50)}), Outputs(features={"text": rand(3, 4, seed=51)}),
      {"text_pool": torch.tensor([60, 61, 62])})
    assert d.queue_ids.tolist() == seen_ids
    assert "queue" not in d.state_dict()  # refills after a resume instead of bloating checkpoints
    # the queue holds every rank's gathered rows, the same on each: kept out of DDP's buffer sync
    assert set(d.rank_synced_buffers) == {"queue", "queue_ids"} <= dict(d.named_buffers()).keys()


def test_rank_one_of_two_uses_the_other_ranks_teacher_rows_as_negatives(monkeypatch):
    """A fake 2-rank gather: rank 1's rows are positives at offset B of the gathered keys."""
    s_all, t_all, ids_all = rand(6, 4, seed=60), rand(6, 4, seed=61), torch.arange(6)
    monkeypatch.setattr(distilcse_module, "world", lambda: (1, 2))

    def gather_nograd(x):  # rank 0's slice (teacher rows or pool ids), then this rank's
        return torch.cat([ids_all[:3] if x.dtype == torch.long else t_all[:3], x])

    monkeypatch.setattr(distilcse_module, "gather_nograd", gather_nograd)
    d = DistilCSE(temperature=0.3, learn_temperature=False, queue_size=0, fields=["text"])
    got = d(Outputs(features={"text": s_all[3:]}), Outputs(features={"text": t_all[3:]}), {"text_pool": ids_all[3:]})
    full = DistilCSE(temperature=0.3, learn_temperature=False, queue_size=0, fields=["text"])
    monkeypatch.setattr(distilcse_module, "world", lambda: (0, 1))
    monkeypatch.setattr(distilcse_module, "gather_nograd", lambda x: x)
    whole = full(Outputs(features={"text": s_all}), Outputs(features={"text": t_all}), {"text_pool": ids_all})
    assert got["loss"].item() == pytest.approx(by_loops(s_all[3:], t_all, [3, 4, 5], 0.3), rel=1e-5)
    # the global loss is the mean of the ranks' losses (what DDP's gradient averaging sees)
    assert whole["loss"].item() == pytest.approx(by_loops(s_all, t_all, list(range(6)), 0.3), rel=1e-5)


def test_projection_and_temperature_learn_with_the_student_teacher_untouched():
    pair = TextPair(student_width=16, teacher_width=24)
    d = DistilCSE(queue_size=0)
    s, t = pair.student_outputs(), pair.teacher_outputs()
    d.build(s, t, None)
    assert isinstance(d.project, torch.nn.Linear) and d.project.weight.shape == (24, 16)
    d(s, t, {})["loss"].backward()
    pair.assert_only_student_learns()
    for name, p in d.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert d.scale().item() == pytest.approx(math.e)  # 1/tau starts at e, the authors' exp(1)


def test_yaml_and_errors():
    d = from_yaml("distilcse")
    assert isinstance(d, DistilCSE) and d.weight == 1.0 and d.queue_size == 4096 and d.mse_weight == 0
    assert d.log_scale is not None and d.scale().item() == pytest.approx(math.e, rel=1e-4) and d.fields is None
    pair = TextPair(student_width=16, teacher_width=16)
    d.build(pair.student_outputs(), pair.teacher_outputs(), None)
    assert isinstance(d.project, torch.nn.Identity)  # same widths: no projection unless asked
    with pytest.raises(KdkitError, match="pool indices"):
        d(pair.student_outputs(), pair.teacher_outputs(), {})
    with pytest.raises(KdkitError, match="projection=false"):
        DistilCSE(projection=False).build(Outputs(features={"text": torch.ones(2, 16)}),
                                          Outputs(features={"text": torch.ones(2, 24)}), None)
    with pytest.raises(KdkitError, match="after projection"):
        DistilCSE(queue_size=0)(Outputs(features={"text": torch.ones(2, 16)}),
                                Outputs(features={"text": torch.ones(2, 24)}), {})
    with pytest.raises(KdkitError, match="> 0"):
        DistilCSE(temperature=0)
    with pytest.raises(KdkitError, match="unknown"):
        DistilCSE(fields=["doc"])
    with pytest.raises(KdkitError, match="lacks"):
        DistilCSE(fields=["query"])(Outputs(features={"text": torch.ones(1, 2)}),
                                    Outputs(features={"text": torch.ones(1, 2)}), {})
