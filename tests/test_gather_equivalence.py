"""2 processes x batch B == 1 process x batch 2B: losses, student (and adapter) gradients, and
CRD's memory banks, for the distillers that look across the batch (``kdkit.distributed.gather``).

Each rank runs the real distiller on its half of a global batch inside DDP (gloo, CPU), so
DDP's gradient averaging is part of what is checked; the reference is the same code on one
process with the whole batch.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import kdkit.distillers.crd as crd_module
from kdkit.distillers.base import DistillContext
from kdkit.distillers.clip_common import contrastive_loss
from kdkit.distillers.crd import CRD
from kdkit.distillers.distilcse import DistilCSE
from kdkit.distillers.listwise import Listwise
from kdkit.outputs import Outputs

pytestmark = pytest.mark.ddp

WORLD, B, N, D = 2, 4, 32, 6  # ranks, per-rank batch, dataset size, input width


def global_batch() -> dict:
    g = torch.Generator().manual_seed(7)
    return {
        "x": torch.randn(WORLD * B, D, generator=g),
        "t": torch.randn(WORLD * B, 10, generator=g),            # teacher embeddings
        "passages": torch.randn(WORLD * B, 3, D, generator=g),    # positive + 2 hard negatives
        "t_passages": torch.randn(WORLD * B, 3, 10, generator=g),
        "index": torch.randperm(N, generator=g)[: WORLD * B],     # distinct dataset indices
    }


def fixed_contrast(index, num_samples, k):
    """CRD's negatives come from each rank's RNG; here they are a function of the index, so the
    1-process and 2-process runs contrast against the same bank rows."""
    steps = 3 * torch.arange(1, k + 1, device=index.device)
    return torch.cat([index[:, None], (index[:, None] + steps) % num_samples], dim=1)


# ---- the three losses, each as (model, loss_fn(model, batch) -> loss) ------------------------
def make_crd():
    torch.manual_seed(0)
    student = nn.Linear(D, 8)
    crd = CRD(weight=1.0, feat_dim=5, nce_k=4, temperature=0.5, momentum=0.5)
    with torch.no_grad():
        crd.build(Outputs(embedding=student(torch.zeros(2, D))), Outputs(embedding=torch.zeros(2, 10)),
                  DistillContext(num_samples=N))
    model = nn.ModuleDict({"student": student, "crd": crd})

    def loss(m, batch):
        s = Outputs(embedding=m["student"](batch["x"]))
        return m["crd"](s, Outputs(embedding=batch["t"]), batch)["loss"]

    return model, loss


def make_listwise():
    torch.manual_seed(0)
    model = nn.ModuleDict({"q": nn.Linear(D, 8), "p": nn.Linear(D, 8)})
    listwise = Listwise(temperature=0.5)

    def loss(m, batch):
        s = Outputs(features={"query": F.normalize(m["q"](batch["x"]), dim=-1),
                              "passage": F.normalize(m["p"](batch["passages"]), dim=-1)})
        t = Outputs(features={"query": F.normalize(batch["t"], dim=-1),
                              "passage": F.normalize(batch["t_passages"], dim=-1)})
        return listwise(s, t, batch)["loss"]

    return model, loss


def make_clip():
    torch.manual_seed(0)
    model = nn.ModuleDict({"image": nn.Linear(D, 8), "text": nn.Linear(10, 8)})

    def loss(m, batch):  # symmetric in-batch InfoNCE, columns gathered over ranks
        image = F.normalize(m["image"](batch["x"]), dim=-1)
        text = F.normalize(m["text"](batch["t"]), dim=-1)
        return contrastive_loss(image, text, 10.0)

    return model, loss


def make_distilcse():
    torch.manual_seed(0)
    student = nn.Linear(D, 8)
    cse = DistilCSE(queue_size=16, fields=["text"])  # projection 8 -> 10, learned temperature
    cse.build(Outputs(features={"text": torch.zeros(2, 8)}), Outputs(features={"text": torch.zeros(2, 10)}), None)
    model = nn.ModuleDict({"student": student, "cse": cse})

    def loss(m, batch):  # buffers checked: the queue holds every rank's teacher rows, in order
        s = Outputs(features={"text": m["student"](batch["x"])})
        return m["cse"](s, Outputs(features={"text": batch["t"]}), {"text_pool": batch["index"]})["loss"]

    return model, loss


CASES = {"crd": make_crd, "listwise": make_listwise, "clip_infonce": make_clip, "distilcse": make_distilcse}


class _Call(nn.Module):
    """Routes DDP's forward to ``loss_fn`` so DDP sees the forward and hooks the backward."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    crd_module.sample_contrast = fixed_contrast
    try:
        full = global_batch()
        local = {k: v[rank * B : (rank + 1) * B] for k, v in full.items()}
        results = {}
        for name, make in CASES.items():
            model, loss_fn = make()
            ddp = DistributedDataParallel(_Call(model, loss_fn), broadcast_buffers=False)
            loss = ddp(local)
            loss.backward()
            value = loss.detach().clone()
            dist.all_reduce(value)
            results[name] = {"loss": value / WORLD,
                             "grads": {k: p.grad.clone() for k, p in model.named_parameters()},
                             "buffers": {k: b.clone() for k, b in model.named_buffers()}}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def single_process(name: str) -> dict:
    model, loss_fn = CASES[name]()
    loss = loss_fn(model, global_batch())
    loss.backward()
    return {"loss": loss.detach(), "grads": {k: p.grad for k, p in model.named_parameters()},
            "buffers": {k: b for k, b in model.named_buffers()}}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True,
                       start_method="fork")
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_match_one_process_with_the_global_batch(two_ranks, name, monkeypatch):
    monkeypatch.setattr(crd_module, "sample_contrast", fixed_contrast)
    ref = single_process(name)
    for rank in range(WORLD):
        got = two_ranks[rank][name]
        torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
        assert set(got["grads"]) == set(ref["grads"]) and ref["grads"]
        for key, grad in ref["grads"].items():
            assert grad.abs().sum() > 0, key  # every parameter really receives a gradient
            torch.testing.assert_close(got["grads"][key], grad, rtol=1e-5, atol=1e-6, msg=key)
        for key, buf in ref["buffers"].items():  # CRD: banks and Z after one step
            torch.testing.assert_close(got["buffers"][key], buf, rtol=1e-5, atol=1e-6, msg=key)


def test_crd_bank_update_really_touches_every_rank_rows(two_ranks, monkeypatch):
    """The bank rows of both ranks' indices moved, identically on both ranks."""
    monkeypatch.setattr(crd_module, "sample_contrast", fixed_contrast)
    model, _ = make_crd()  # the banks before the step (same seed)
    before = model["crd"].memory_s
    index = global_batch()["index"]
    after0, after1 = (two_ranks[r]["crd"]["buffers"]["crd.memory_s"] for r in range(WORLD))
    torch.testing.assert_close(after0, after1, rtol=0, atol=0)
    moved = (after0 - before).abs().sum(1) > 0
    assert moved[index].all() and not moved[[i for i in range(N) if i not in set(index.tolist())]].any()
    assert torch.equal(two_ranks[0]["crd"]["buffers"]["crd.z"], two_ranks[1]["crd"]["buffers"]["crd.z"])
