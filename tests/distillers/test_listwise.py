"""Listwise KL over in-batch + hard negatives; 2 processes x B == 1 process x 2B."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdkit.distillers.listwise import Listwise, listwise_kl
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

from .helpers import from_yaml
from .test_embed import TextPair


def by_loops(sq, sp, tq, tp, tau, tau_t):
    """(1/B) sum_i sum_j p_t(j|i) log(p_t(j|i) / p_s(j|i)), p = softmax over all passages."""
    total = 0.0
    for i in range(sq.shape[0]):
        s = [sum(a * b for a, b in zip(sq[i].tolist(), p.tolist())) / tau for p in sp]
        t = [sum(a * b for a, b in zip(tq[i].tolist(), p.tolist())) / tau_t for p in tp]
        zs, zt = sum(math.exp(x) for x in s), sum(math.exp(x) for x in t)
        total += sum(math.exp(b) / zt * math.log((math.exp(b) / zt) / (math.exp(a) / zs)) for a, b in zip(s, t))
    return total / sq.shape[0]


def data(b=4, g=3, d=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=gen), dim=-1)  # noqa: E731
    return unit(b, d), unit(b, g, d), unit(b, d), unit(b, g, d)


def test_two_passages_by_hand():
    # one query, scores s = (1, 0), t = (ln 3, 0) at tau = 1: p_s = (e/(e+1), 1/(e+1)), p_t = (3/4, 1/4)
    sq, tq = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    sp = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tp = torch.tensor([[math.log(3.0), 0.0], [0.0, 1.0]])
    ps = [math.e / (math.e + 1), 1 / (math.e + 1)]
    expected = 0.75 * math.log(0.75 / ps[0]) + 0.25 * math.log(0.25 / ps[1])
    assert listwise_kl(sq, sp, tq, tp, 1.0).item() == pytest.approx(expected, abs=1e-8)


def test_every_passage_of_the_batch_is_a_candidate():
    sq, sp, tq, tp = data()
    got = Listwise(temperature=0.1, teacher_temperature=0.2)(
        Outputs(features={"query": sq, "passage": sp}), Outputs(features={"query": tq, "passage": tp}), {})
    expected = by_loops(sq, sp.reshape(-1, 5), tq, tp.reshape(-1, 5), 0.1, 0.2)
    assert got["loss"].item() == pytest.approx(expected, rel=1e-5)
    same = Outputs(features={"query": tq, "passage": tp})
    assert Listwise()(same, same, {})["loss"].item() == pytest.approx(0, abs=1e-6)


def test_a_scorer_teacher_gives_a_kl_over_each_querys_own_group():
    """features["scores"] [B, G]: the softmaxes run over the query's group, not the whole batch."""
    sq, sp, _, _ = data(b=3, g=4)
    t = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    got = Listwise(temperature=0.1, teacher_temperature=0.5)(
        Outputs(features={"query": sq, "passage": sp}), Outputs(features={"scores": t}), {})["loss"].item()
    expected = 0.0
    for i in range(3):
        s = [float(sq[i] @ sp[i, j]) / 0.1 for j in range(4)]
        u = [float(t[i, j]) / 0.5 for j in range(4)]
        zs, zt = sum(math.exp(x) for x in s), sum(math.exp(x) for x in u)
        expected += sum(math.exp(b) / zt * (b - math.log(zt) - a + math.log(zs)) for a, b in zip(s, u)) / 3
    assert got == pytest.approx(expected, rel=1e-5)
    with pytest.raises(KdkitError, match="teacher scores"):
        Listwise()(Outputs(features={"query": sq, "passage": sp}), Outputs(features={"scores": t[:, :3]}), {})


def test_gradients_reach_only_the_student():
    pair = TextPair(student_width=16, teacher_width=24)
    Listwise()(pair.student_outputs(), pair.teacher_outputs(), {})["loss"].backward()
    pair.assert_only_student_learns()


def test_yaml_and_errors():
    d = from_yaml("listwise")
    assert isinstance(d, Listwise) and d.temperature == 0.05 and d.teacher_temperature is None
    with pytest.raises(KdkitError, match="> 0"):
        Listwise(temperature=0)
    s = Outputs(features={"query": torch.ones(2, 3), "passage": torch.ones(2, 2, 3)})
    t = Outputs(features={"query": torch.ones(2, 3), "passage": torch.ones(2, 3, 3)})
    with pytest.raises(KdkitError, match="passage groups"):
        d(s, t, {})


def _rank(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    sq, sp, tq, tp = data(b=4)
    half = slice(2 * rank, 2 * rank + 2)
    q, p = sq[half].clone().requires_grad_(), sp[half].clone().requires_grad_()
    loss = Listwise(temperature=0.1)(Outputs(features={"query": q, "passage": p}),
                                     Outputs(features={"query": tq[half], "passage": tp[half]}), {})["loss"]
    loss.backward()
    torch.save({"loss": loss.detach(), "q": q.grad, "p": p.grad}, f"{out_file}.{rank}")
    dist.destroy_process_group()


@pytest.mark.ddp
def test_two_ranks_match_one_process_with_the_global_batch(tmp_path):
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2)
    sq, sp, tq, tp = data(b=4)
    q, p = sq.clone().requires_grad_(), sp.clone().requires_grad_()
    full = Listwise(temperature=0.1)(Outputs(features={"query": q, "passage": p}),
                                     Outputs(features={"query": tq, "passage": tp}), {})["loss"]
    full.backward()
    ranks = [torch.load(tmp_path / f"out.{r}") for r in range(2)]
    # DDP averages gradients over ranks: the mean of the rank losses / grads is the 1 x 2B figure.
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(full.item(), rel=1e-5)
    assert torch.allclose(torch.cat([r["q"] for r in ranks]) / 2, q.grad, atol=1e-6)
    assert torch.allclose(torch.cat([r["p"] for r in ranks]) / 2, p.grad, atol=1e-6)
