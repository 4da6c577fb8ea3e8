"""BatchSelect: scores against their formulas, the top rows kept, determinism, and the same
global selection on 2 DDP ranks as in one process."""

import functools
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from kdkit.errors import KdkitError
from kdkit.labels import UNLABELED
from kdkit.outputs import Outputs
from kdkit.selection.base import StepPlan
from kdkit.selection.batch_select import BatchSelect, select_rows
from kdkit.tasks.classification import ClassificationTask
from tests.helpers import TinyNet, image_batch


def _task(seed=0):
    torch.manual_seed(seed)
    return ClassificationTask(TinyNet(), TinyNet(), distillers={}, num_classes=3,
                              optimizer=functools.partial(torch.optim.SGD, lr=0.1))


def test_select_rows_keeps_the_top_scores_and_deals_them_to_ranks_in_index_order():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.0, 0.7, 0.3, 0.8])
    assert select_rows(scores, 0, 8, 0.5).tolist() == [1, 3, 5, 7]
    # two ranks of 4 rows: the global top 4 are rows 1, 3, 5, 7 -> rank 0 gets 1, 3; rank 1 gets 5, 7
    assert select_rows(scores, 0, 4, 0.5).tolist() == [1, 3]
    assert select_rows(scores, 1, 4, 0.5).tolist() == [5, 7]
    # a tie goes to the lower index
    assert select_rows(torch.tensor([1.0, 2.0, 2.0, 0.0]), 0, 4, 0.25).tolist() == [1]


def test_learnability_is_student_loss_minus_teacher_loss_with_teacher_argmax_where_unlabelled():
    task = _task()
    batch = image_batch(6)
    batch["label"][4:] = UNLABELED
    policy = BatchSelect(keep=0.5, score="learnability")
    t = task.teacher_outputs(batch)
    scores = policy.scores(task, batch, t, 6, 0)
    with torch.no_grad():
        s = task.student(batch["image"])
    y = batch["label"].clone()
    y[4:] = t.logits[4:].argmax(-1)
    want = F.cross_entropy(s, y, reduction="none") - F.cross_entropy(t.logits, y, reduction="none")
    assert torch.allclose(scores, want, atol=1e-6)


def test_the_plan_keeps_the_top_rows_with_their_teacher_outputs():
    task = _task()
    batch = image_batch(8)
    policy = BatchSelect(keep=0.5, score="disagreement", temperature=2.0)
    plan = policy.plan(task, StepPlan(batch))
    t = task.teacher_outputs(batch).logits
    with torch.no_grad():
        s = task.student(batch["image"])
    p, q = (t / 2).log_softmax(-1), (s / 2).log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)
    top = sorted(kl.argsort(descending=True)[:4].tolist())
    assert plan.batch["index"].tolist() == top and plan.distill_rows is None
    assert torch.allclose(plan.teacher["teacher"].logits, t[top])
    assert policy.summary()["rows_scored"] == 8 and policy.summary()["rows_kept"] == 4


def test_random_scores_are_deterministic_given_the_seed_and_differ_between_seeds():
    task, batch = _task(), image_batch(16)
    pick = lambda seed: BatchSelect(score="random", seed=seed).plan(task, StepPlan(batch)).batch["index"].tolist()
    assert pick(3) == pick(3) and pick(3) != pick(4)


def test_learnability_selection_is_deterministic_and_trains_on_the_kept_rows():
    task = _task()
    task.selection = {"batch_select": BatchSelect(keep=0.25)}
    first = BatchSelect(keep=0.25).plan(task, StepPlan(image_batch(8))).batch["index"].tolist()
    assert first == BatchSelect(keep=0.25).plan(task, StepPlan(image_batch(8))).batch["index"].tolist()
    _, s = task.losses(image_batch(8))
    assert s.logits.shape[0] == 2


@pytest.mark.parametrize("bad", [{"keep": 0.0}, {"keep": 1.5}, {"score": "loss"}, {"scope": "world"},
                                 {"temperature": 0.0}])
def test_bad_knobs_are_refused_by_name(bad):
    with pytest.raises(KdkitError, match="selection.batch_select"):
        BatchSelect(**bad)


def test_it_refuses_to_run_after_a_policy_that_restricted_the_distilled_rows():
    plan = StepPlan(image_batch(4), {"teacher": Outputs(logits=torch.zeros(1, 3))}, torch.tensor([0]))
    with pytest.raises(KdkitError, match="before"):
        BatchSelect().plan(_task(), plan)


# ---- two DDP ranks ---------------------------------------------------------------------------
WORLD, LOCAL = 2, 6


def _worker(rank: int, init_file: str, out_dir: str, score: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        full = image_batch(WORLD * LOCAL, seed=5)
        local = {k: v[rank * LOCAL : (rank + 1) * LOCAL] for k, v in full.items()}
        plan = BatchSelect(keep=0.5, score=score, seed=1).plan(_task(), StepPlan(local))
        torch.save({"index": plan.batch["index"], "image": plan.batch["image"],
                    "teacher": plan.teacher["teacher"].logits}, os.path.join(out_dir, f"{score}{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("score", ["learnability", "random"])
def test_two_ranks_select_the_global_top_rows_like_one_process(tmp_path, score):
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path), score), nprocs=WORLD, join=True,
                       start_method="fork")
    ranks = [torch.load(tmp_path / f"{score}{r}.pt") for r in range(WORLD)]
    full = image_batch(WORLD * LOCAL, seed=5)
    single = BatchSelect(keep=0.5, score=score, seed=1).plan(_task(), StepPlan(full))
    assert torch.cat([r["index"] for r in ranks]).tolist() == single.batch["index"].tolist()
    assert all(len(r["index"]) == LOCAL // 2 for r in ranks)  # equal shares
    for r in ranks:  # rows may come from the other rank: images and teacher outputs follow them
        assert torch.equal(r["image"], full["image"][r["index"]])
        assert torch.allclose(r["teacher"], single.teacher["teacher"].logits[
            [single.batch["index"].tolist().index(i) for i in r["index"].tolist()]], atol=1e-6)


def test_pair_scores_are_per_pair_infonce_differences_for_clip_outputs():
    from kdkit.selection.batch_select import pair_losses

    g = torch.Generator().manual_seed(0)
    unit = lambda t: F.normalize(t, dim=-1)
    make = lambda scale: Outputs(embedding=unit(torch.randn(4, 5, generator=g)),
                                 features={"text_embedding": unit(torch.randn(4, 5, generator=g)),
                                           "logit_scale": torch.tensor(scale)})
    teacher, student = make(10.0), make(3.0)
    sim = 3.0 * student.embedding @ student.features["text_embedding"].T
    by_hand = torch.stack([0.5 * (-sim[i].log_softmax(0)[i] - sim[:, i].log_softmax(0)[i]) for i in range(4)])
    assert torch.allclose(pair_losses(student), by_hand, atol=1e-6)
    policy = BatchSelect(score="learnability")
    assert torch.allclose(policy.pair_scores(teacher, student), pair_losses(student) - pair_losses(teacher))
    kept = StepPlan({"image": torch.zeros(4, 1), "index": torch.arange(4)}, {"teacher": teacher}).keep(
        torch.tensor([2, 0]))
    assert kept.teacher["teacher"].features["logit_scale"].item() == 10.0  # a scalar is no row
    with pytest.raises(KdkitError, match="neither"):
        policy.pair_scores(Outputs(embedding=torch.zeros(2, 3)), student)
