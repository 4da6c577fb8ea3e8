"""2 processes x B == 1 process x 2B for the CLIP loss and every CLIP distiller (and the
evaluation embeddings the image-text metrics are computed from).

Two gloo processes each compute a loss on their half of a global batch (local rows against the
columns gathered by ``kdkit.distributed.gather``) and average gradients as DDP does; the loss and
the gradients of a tiny linear "CLIP student" (and of the distillers' own parameters) must equal
those of one process on the whole batch. The same holds on transfer data, where some images have
no caption (``captioned``): rank 0 holds 3 captioned rows, rank 1 one.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from kdkit.distillers.affinity import Affinity
from kdkit.distillers.base import DistillContext
from kdkit.distillers.clip_common import contrastive_loss
from kdkit.distillers.clip_crd import ClipCRD
from kdkit.distillers.clip_fd import ClipFD
from kdkit.distillers.clip_icl import ClipICL
from kdkit.tasks.image_text_metrics import EvalEmbeddings
from tests.distillers.clip_helpers import LinearClip, clip_outputs

B, IN, S_DIM, T_DIM, WORLD = 4, 5, 3, 6, 2
LOSSES = {"task": None, "clip_fd": ClipFD, "clip_icl": ClipICL, "clip_crd": ClipCRD, "affinity": Affinity}
CAPTIONED = torch.tensor([True, True, False, True, False, False, True, False])  # 3 on rank 0, 1 on rank 1


def global_batch():
    g = torch.Generator().manual_seed(0)
    x_image, x_text = torch.randn(WORLD * B, IN, generator=g), torch.randn(WORLD * B, IN, generator=g)
    t_image = F.normalize(torch.randn(WORLD * B, T_DIM, generator=g), dim=-1)
    t_text = F.normalize(torch.randn(WORLD * B, T_DIM, generator=g), dim=-1)
    return x_image, x_text, t_image, t_text


def loss_and_grads(name: str, rows: slice, transfer: bool = False):
    """Loss on ``rows`` of the global batch and the gradients of every trainable parameter
    (``transfer``: the rows outside ``CAPTIONED`` have no caption)."""
    x_image, x_text, t_image, t_text = global_batch()
    torch.manual_seed(0)
    student = LinearClip(IN, S_DIM)
    params = list(student.parameters())
    teacher = clip_outputs(t_image[rows], t_text[rows], torch.tensor(15.0))
    s = student(x_image[rows], x_text[rows])
    batch = {"captioned": CAPTIONED[rows]} if transfer else {}
    if LOSSES[name] is None:
        loss = contrastive_loss(s.embedding, s.features["text_embedding"], s.features["logit_scale"],
                                keep=batch.get("captioned"))
    else:
        distiller = LOSSES[name]()
        distiller.build(s, teacher, DistillContext())  # projections: same seed on every rank
        params += list(distiller.parameters())
        loss = sum(distiller(s, teacher, batch).values())
    loss.backward()
    return loss.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


def eval_store(rows: list[int]) -> dict:
    """Evaluation embeddings of ``rows`` of a fixed 7-sample test set, through ``EvalEmbeddings``."""
    g = torch.Generator().manual_seed(1)
    image, text = torch.randn(7, 3, generator=g), torch.randn(7, 3, generator=g)
    index = torch.arange(7) * 10
    store = EvalEmbeddings()
    store.update(image[rows], text[rows], index[rows], index[rows] % 3, index[rows] % 2)
    return store.compute()


def _worker(rank: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {}
    for name in LOSSES:
        for transfer in (False, True):
            loss, grads = loss_and_grads(name, slice(rank * B, (rank + 1) * B), transfer)
            for t in (loss, *grads):  # what DDP does to gradients (and a mean of the loss)
                dist.all_reduce(t)
                t /= WORLD
            results[(name, transfer)] = (loss, grads)
    # evaluation: rank 1 ends with a repeat of sample 0, as DistributedSampler pads
    results["eval"] = eval_store([0, 1, 2, 3] if rank == 0 else [4, 5, 6, 0])
    if rank == 0:
        torch.save(results, out_file)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.ddp
def test_two_processes_of_b_equal_one_process_of_2b(tmp_path):
    out = tmp_path / "ddp.pt"
    # fork: the children reuse the imported modules (spawn re-imports torch: seconds per child)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_worker, args=(str(tmp_path / "pg"), str(out)), nprocs=WORLD, join=True,
                       start_method=method)
    ddp = torch.load(out, weights_only=True)
    for name in LOSSES:
        for transfer in (False, True):
            loss, grads = loss_and_grads(name, slice(0, WORLD * B), transfer)
            got, what = ddp[(name, transfer)], f"{name}{' (transfer)' if transfer else ''}"
            torch.testing.assert_close(got[0], loss, rtol=1e-5, atol=1e-5, msg=f"{what} loss")
            assert len(grads) == len(got[1])
            for i, (a, b) in enumerate(zip(got[1], grads)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{what} gradient {i}")
    single = eval_store(list(range(7)))
    assert ddp["eval"].keys() == single.keys()
    for key, value in single.items():
        torch.testing.assert_close(ddp["eval"][key], value, msg=key)  # gathered, de-duplicated


def test_contrastive_losses_differ_without_the_global_batch():
    """The check above has teeth: local-only halves give other values for the batch-level losses
    (FD is per-sample, so its halves average to the full-batch value by construction)."""
    for name in ("task", "clip_icl", "clip_crd", "affinity"):
        halves = [loss_and_grads(name, slice(r * B, (r + 1) * B))[0] for r in range(WORLD)]
        full = loss_and_grads(name, slice(0, WORLD * B))[0]
        assert abs(sum(halves) / WORLD - full) > 1e-3, name
    halves = [loss_and_grads("clip_fd", slice(r * B, (r + 1) * B))[0] for r in range(WORLD)]
    torch.testing.assert_close(sum(halves) / WORLD, loss_and_grads("clip_fd", slice(0, WORLD * B))[0])
