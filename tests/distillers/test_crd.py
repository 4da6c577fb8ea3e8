import math

import pytest
import torch
import torch.nn.functional as F

from kdkit.distillers.base import DistillContext
from kdkit.distillers.crd import CRD, infonce_loss, nce_loss, sample_contrast
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

from .helpers import Pair, assert_gradients, build, distill_backward, from_yaml, image_batch

N = 10  # training-set size of the hand-made cases


def built_crd(s_dim=3, t_dim=4, n=N, **kwargs) -> CRD:
    torch.manual_seed(0)
    d = CRD(feat_dim=2, **kwargs)
    d.build(Outputs(embedding=torch.zeros(1, s_dim)), Outputs(embedding=torch.zeros(1, t_dim)),
            DistillContext(num_samples=n))
    return d


def nce_by_loops(p, n):
    """Eq. 18 of CRD: -(1/B) sum_i [log(p0 / (p0 + K/N)) + sum_k log((K/N) / (pk + K/N))]."""
    total = 0.0
    for row in p.tolist():
        k = len(row) - 1
        total += math.log(row[0] / (row[0] + k / n + 1e-7))
        total += sum(math.log((k / n) / (q + k / n + 1e-7)) for q in row[1:])
    return -total / len(p)


def test_nce_and_infonce_by_loops():
    p = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.5, 0.05]])
    assert nce_loss(p, 4).item() == pytest.approx(nce_by_loops(p, 4), rel=1e-6)
    scores = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    expected = -(math.log(math.exp(2) / (math.exp(2) + 1 + math.e))
                 + math.log(1 / (1 + 2 * math.e))) / 2
    assert infonce_loss(scores).item() == pytest.approx(expected, rel=1e-6)


def test_negatives_are_deterministic_uniform_and_exclude_the_positive():
    index = torch.tensor([0, 4, 9])
    torch.manual_seed(3)
    a = sample_contrast(index, N, 500)
    torch.manual_seed(3)
    b = sample_contrast(index, N, 500)
    assert torch.equal(a, b) and a.shape == (3, 501)
    assert torch.equal(a[:, 0], index)
    for row, i in zip(a[:, 1:], index.tolist()):
        assert set(row.tolist()) == set(range(N)) - {i}  # every other index, never the positive


def test_build_caps_k_and_registers_persistent_banks():
    d = built_crd(nce_k=16384)
    assert d.k == N - 1
    state = d.state_dict()
    assert state["memory_s"].shape == (N, 2) and state["memory_t"].shape == (N, 2)
    assert state["z"].tolist() == [-1.0, -1.0]
    assert {"embed_s.linear.weight", "embed_t.linear.weight"} <= set(state)
    # every rank applies the gathered updates itself: DDP need not broadcast the banks each step
    assert CRD().rank_synced_buffers == ()  # nothing before build
    assert set(d.rank_synced_buffers) == {"memory_s", "memory_t", "z"} <= dict(d.named_buffers()).keys()


def test_nce_loss_and_bank_update_by_hand():
    d = built_crd(nce_k=3, momentum=0.3, temperature=0.5).train()
    s, t = torch.randn(2, 3), torch.randn(2, 4)
    index = torch.tensor([7, 2])
    bank_s, bank_t = d.memory_s.clone(), d.memory_t.clone()
    torch.manual_seed(11)
    loss = d(Outputs(embedding=s), Outputs(embedding=t), {"index": index})["loss"]

    torch.manual_seed(11)
    contrast = sample_contrast(index, N, 3)
    v_s = F.normalize(d.embed_s.linear(s), dim=1).detach()
    v_t = F.normalize(d.embed_t.linear(t), dim=1).detach()
    p_s = torch.tensor([[math.exp(bank_t[j] @ v_s[i] / 0.5) for j in contrast[i]] for i in range(2)])
    p_t = torch.tensor([[math.exp(bank_s[j] @ v_t[i] / 0.5) for j in contrast[i]] for i in range(2)])
    z_s, z_t = p_s.mean().item() * N, p_t.mean().item() * N  # Z fixed on this first batch
    assert d.z.tolist() == pytest.approx([z_s, z_t], rel=1e-5)
    assert loss.item() == pytest.approx(nce_by_loops(p_s / z_s, N) + nce_by_loops(p_t / z_t, N), rel=1e-4)

    for bank, old, v in ((d.memory_s, bank_s, v_s), (d.memory_t, bank_t, v_t)):
        for row, i in enumerate(index.tolist()):
            mixed = 0.3 * old[i] + 0.7 * v[row]  # m * bank + (1 - m) * v
            assert torch.allclose(bank[i], mixed / mixed.norm(), atol=1e-6)
        untouched = [i for i in range(N) if i not in index.tolist()]
        assert torch.equal(bank[untouched], old[untouched])

    z_before, banks_before = d.z.clone(), (d.memory_s.clone(), d.memory_t.clone())
    d.eval()(Outputs(embedding=s), Outputs(embedding=t), {"index": index})  # no update in eval
    assert torch.equal(d.memory_s, banks_before[0]) and torch.equal(d.memory_t, banks_before[1])
    d.train()(Outputs(embedding=s), Outputs(embedding=t), {"index": index})
    assert torch.equal(d.z, z_before)  # Z is set once


def test_infonce_variant_by_hand():
    d = built_crd(nce_k=2, temperature=0.1, loss="infonce").eval()
    s, t = torch.randn(3, 3), torch.randn(3, 4)
    index = torch.tensor([1, 5, 8])
    torch.manual_seed(5)
    loss = d(Outputs(embedding=s), Outputs(embedding=t), {"index": index})["loss"]
    torch.manual_seed(5)
    contrast = sample_contrast(index, N, 2)
    v_s, v_t = F.normalize(d.embed_s.linear(s), dim=1), F.normalize(d.embed_t.linear(t), dim=1)
    expected = 0.0
    for v, bank in ((v_s, d.memory_t), (v_t, d.memory_s)):
        for i in range(3):
            logits = [(bank[j] @ v[i]).item() / 0.1 for j in contrast[i]]
            expected -= (logits[0] - math.log(sum(math.exp(x) for x in logits))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_banks_and_z_survive_a_checkpoint_round_trip():
    d = built_crd(nce_k=4).train()
    batch = {"index": torch.tensor([0, 3])}
    d(Outputs(embedding=torch.randn(2, 3)), Outputs(embedding=torch.randn(2, 4)), batch)
    resumed = built_crd(nce_k=4)
    resumed.load_state_dict(d.state_dict())
    for key, value in d.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert (resumed.z > 0).all()


def test_needs_index_and_dataset_size():
    d = built_crd()
    with pytest.raises(KdkitError, match="index"):
        d(Outputs(embedding=torch.zeros(2, 3)), Outputs(embedding=torch.zeros(2, 4)), {})
    with pytest.raises(KdkitError, match="num_train_samples"):
        CRD().build(Outputs(embedding=torch.zeros(1, 3)), Outputs(embedding=torch.zeros(1, 4)),
                    DistillContext())
    with pytest.raises(KdkitError, match="nce|infonce"):
        CRD(loss="margin")


def test_gradients_reach_student_and_both_heads_only():
    d = CRD(nce_k=8)
    pair = Pair(d)
    batch = image_batch()
    build(d, pair, batch, num_samples=18)
    terms = distill_backward(d, pair, batch)
    assert set(terms) == {"loss"} and torch.isfinite(terms["loss"])
    assert_gradients(pair, d, ["conv1", "layer1", "layer2", "layer3"])


def test_yaml_instantiates_and_runs():
    d = from_yaml("crd")
    knobs = (d.feat_dim, d.nce_k, d.temperature, d.momentum, d.loss, d.weight)
    assert knobs == (128, 16384, 0.07, 0.5, "nce", 0.8)
    pair = Pair(d)
    batch = image_batch()
    build(d, pair, batch, num_samples=18)
    assert d.k == 17 and d.memory_s.shape == (18, 128)
    loss = d.train()(pair.student_outputs(batch), pair.teacher_outputs(batch), batch)["loss"]
    assert torch.isfinite(loss) and loss > 0


def _ddp_bank_worker(rank: int, world_size: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        d = built_crd(nce_k=4, momentum=0.3).train()  # same seed -> same heads and banks
        torch.manual_seed(1)
        s, t, index = torch.randn(4, 3), torch.randn(4, 4), torch.tensor([6, 1, 8, 3])
        rows = slice(2 * rank, 2 * rank + 2)  # each rank sees half of the batch
        d(Outputs(embedding=s[rows]), Outputs(embedding=t[rows]), {"index": index[rows]})
        torch.save({k: v for k, v in d.state_dict().items() if k.startswith("memory")}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.ddp
def test_two_ranks_update_the_banks_like_one_process_with_the_whole_batch(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_bank_worker, args=(2, port, str(tmp_path / "banks")), nprocs=2)
    d = built_crd(nce_k=4, momentum=0.3).train()
    torch.manual_seed(1)
    s, t, index = torch.randn(4, 3), torch.randn(4, 4), torch.tensor([6, 1, 8, 3])
    d(Outputs(embedding=s), Outputs(embedding=t), {"index": index})
    for rank in range(2):
        banks = torch.load(tmp_path / f"banks.{rank}")
        assert torch.allclose(banks["memory_s"], d.memory_s, atol=1e-6)
        assert torch.allclose(banks["memory_t"], d.memory_t, atol=1e-6)
