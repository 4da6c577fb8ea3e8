"""The selection contract: StepPlan row bookkeeping and how the task consumes a plan."""

import functools

import torch

from kdkit.distillers.base import Distiller
from kdkit.labels import UNLABELED
from kdkit.outputs import Outputs
from kdkit.selection.base import SelectionPolicy, StepPlan, per_sample_kl, score_student
from kdkit.tasks.classification import ClassificationTask
from tests.helpers import BNNet, TinyNet, image_batch


def test_keep_maps_rows_distilled_rows_and_teacher_outputs():
    batch = {"x": torch.arange(6) * 10, "meta": "kept as is"}
    teacher = Outputs(logits=torch.tensor([[1.0], [3.0], [5.0]]))  # rows 1, 3, 5 are distilled
    plan = StepPlan(batch, {"t": teacher}, torch.tensor([1, 3, 5]))
    kept = plan.keep(torch.tensor([5, 0, 1]))
    assert kept.batch["x"].tolist() == [50, 0, 10] and kept.batch["meta"] == "kept as is"
    # old rows 1 and 5 stay distilled, now at positions 2 and 0; their teacher rows follow them
    assert kept.distill_rows.tolist() == [2, 0]
    assert kept.teacher["t"].logits.flatten().tolist() == [1.0, 5.0]
    assert kept.distilled_batch()["x"].tolist() == [10, 50]
    whole = StepPlan(batch, {"t": Outputs(logits=torch.arange(6.0)[:, None])}).keep(torch.tensor([4, 2]))
    assert whole.distill_rows is None and whole.teacher["t"].logits.flatten().tolist() == [4.0, 2.0]


def test_per_sample_kl_matches_the_formula():
    t, s = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.5, 0.5, 0.0]])
    p, q = t.softmax(-1), s.softmax(-1)
    assert torch.allclose(per_sample_kl(t, s), (p * (p / q).log()).sum(-1))
    assert torch.allclose(per_sample_kl(t, s, 2.0), per_sample_kl(t / 2, s / 2))


class Recorder(Distiller):
    def forward(self, student, teacher, batch):
        self.seen = (student.logits.detach(), teacher.logits, batch["index"])
        return {"loss": (student.logits - teacher.logits).pow(2).mean()}


class DistilOnly(SelectionPolicy):
    """Distil rows 0 and 2 with made-up teacher outputs."""

    def __init__(self, rows):
        self.rows = rows

    def plan(self, task, plan):
        rows = torch.tensor(self.rows, dtype=torch.long)
        return StepPlan(plan.batch, {"teacher": Outputs(logits=torch.full((len(rows), 3), 7.0))}, rows)


def _task(policy):
    teacher = TinyNet()
    calls = []
    teacher.register_forward_hook(lambda m, i, o: calls.append(len(o)))
    task = ClassificationTask(TinyNet(), teacher, distillers={"rec": Recorder()}, num_classes=3,
                              optimizer=functools.partial(torch.optim.SGD, lr=0.1), selection={"p": policy})
    task.build(image_batch(6))
    calls.clear()
    return task, calls


def test_the_task_distils_only_the_planned_rows_with_the_planned_teacher_outputs():
    task, calls = _task(DistilOnly([0, 2]))
    batch = image_batch(6)
    losses, s = task.losses(batch)
    student, teacher, index = task.distillers["rec"].seen
    assert index.tolist() == [0, 2] and torch.equal(student, s.logits.detach()[[0, 2]])
    assert torch.equal(teacher, torch.full((2, 3), 7.0)) and calls == []  # the teacher never ran
    assert set(losses) == {"task", "rec"} and s.logits.shape[0] == 6  # the task loss sees all rows


def test_a_batch_with_nothing_to_learn_costs_a_zero_loss_not_an_error():
    task, calls = _task(DistilOnly([]))
    batch = {**image_batch(6), "label": torch.full((6,), UNLABELED)}
    losses, _ = task.losses(batch)
    assert float(sum(losses.values()).detach()) == 0.0 and calls == []


def test_score_student_leaves_batchnorm_statistics_alone():
    task = ClassificationTask(BNNet(), TinyNet(), num_classes=3)
    before = [b.clone() for b in task.student.buffers()]
    out = score_student(task, image_batch(6))
    assert not out.logits.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(before, task.student.buffers()))
