"""DistillationTask's public hooks (eval_step, param_groups, callbacks) and its one task-loss rule."""

import inspect

import pytest
import torch
from torch import nn

from kdkit.tasks.base import DistillationTask
from kdkit.tasks.node import NodeTask
from kdkit.tasks.retrieval import RetrievalTask
from tests.tasks.tiny_task import AdapterMSE, ScriptedTask, VectorData, scripted_task, trainer


class CountingEval(ScriptedTask):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = []

    def eval_step(self, stage, batch):
        self.calls.append((stage, len(batch["x"])))


def test_eval_step_is_the_public_hook_of_validation_and_test():
    assert not hasattr(DistillationTask, "_eval_step")
    task = CountingEval(scores=[0.5], student=nn.Linear(4, 2),
                        optimizer=lambda groups: torch.optim.SGD(groups, lr=0.1))
    batch = VectorData().example_batch()
    task.validation_step(batch, 0)
    task.test_step(batch, 1)
    assert task.calls == [("val", 4), ("test", 4)]
    # a Trainer's validation goes through it too
    trainer(1, num_sanity_val_steps=0).fit(task, datamodule=VectorData())
    assert task.calls[2:] == [("val", 4)]
    assert "_eval_step" not in vars(RetrievalTask) and "eval_step" in vars(RetrievalTask)


class TwoGroups(ScriptedTask):
    def param_groups(self):
        (group,) = super().param_groups()
        weights = [p for p in group["params"] if p.ndim == 2]
        return [{"params": weights}, {"params": [p for p in group["params"] if p.ndim < 2], "lr": 0.5},
                {"params": []}]  # empty: dropped


def test_param_groups_default_is_one_group_of_every_trainable_parameter():
    task = scripted_task([0.5])
    task.build(VectorData().example_batch())
    (group,) = task.param_groups()
    trainable = [p for p in task.parameters() if p.requires_grad]
    assert [id(p) for p in group["params"]] == [id(p) for p in trainable]
    assert {id(p) for p in task.distillers.parameters()} <= {id(p) for p in group["params"]}
    assert {id(p) for p in task.teacher.parameters()}.isdisjoint(id(p) for p in group["params"])
    (opt_group,) = task.configure_optimizers().param_groups  # the same optimizer as a plain list
    assert opt_group["lr"] == 0.1 and [id(p) for p in opt_group["params"]] == [id(p) for p in trainable]


def test_param_groups_override_reaches_the_optimizer_with_its_options():
    seen = []

    def factory(groups):
        seen.append(groups)
        return torch.optim.SGD(groups, lr=0.1)

    task = TwoGroups(scores=[0.5], student=nn.Linear(4, 2), optimizer=factory)
    opt = task.configure_optimizers()
    assert len(seen) == 1 and len(seen[0]) == 2  # the empty group never reaches the factory
    weights, biases = opt.param_groups
    assert weights["lr"] == 0.1 and biases["lr"] == 0.5
    assert weights["params"] == [task.student.weight] and biases["params"] == [task.student.bias]


def test_without_distillers_the_task_loss_has_weight_one_in_the_base_alone():
    assert scripted_task([0.5], distill=False, task_loss_weight=0.0).task_loss_weight == 1.0
    assert scripted_task([0.5], distill=False).task_loss_weight == 1.0
    assert scripted_task([0.5], task_loss_weight=0.0).task_loss_weight == 0.0
    assert scripted_task([0.5], task_loss_weight=0.3).task_loss_weight == 0.3
    assert scripted_task([0.5]).task_loss_weight == 1.0  # the class default

    class DistillOnly(ScriptedTask):
        default_task_loss_weight = 0.0

    teacher = {"teacher": nn.Linear(4, 3), "distillers": {"mse": scripted_task([]).distillers["mse"]}}
    assert DistillOnly(student=nn.Linear(4, 2), **teacher).task_loss_weight == 0.0
    assert DistillOnly(student=nn.Linear(4, 2), task_loss_weight=0.0).task_loss_weight == 1.0
    assert RetrievalTask.default_task_loss_weight == 0.0
    for cls in (NodeTask, RetrievalTask):  # no copies of the rule in the subclasses
        assert "task_loss_weight" not in inspect.getsource(cls.__init__)


def test_channels_last_is_not_a_generic_option():
    with pytest.raises(TypeError, match="channels_last"):
        scripted_task([0.5], channels_last=True)
    assert "channels_last" not in inspect.signature(DistillationTask.__init__).parameters


def test_task_callbacks_are_lightning_callbacks():
    from kdkit.errors import KdkitError

    with pytest.raises(KdkitError, match="not a Lightning Callback"):
        scripted_task([0.5], callbacks=[object()])
    assert scripted_task([0.5], callbacks={"off": None}).task_callbacks == []


class RecordingDistiller(AdapterMSE):
    """Doubles the student's input in training (a stand-in for masking) and records what it saw."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def build(self, student, teacher, context):
        super().build(student, teacher, context)
        self.seen["models"] = dict(context.models)

    def student_batch(self, batch):
        return {**batch, "x": 2 * batch["x"], "doubled": True}

    def forward(self, student, teacher, batch):
        self.seen["batch"] = batch
        return super().forward(student, teacher, batch)


def test_student_batch_reaches_the_student_only_in_training():
    torch.manual_seed(0)
    d = RecordingDistiller()
    task = ScriptedTask(student=nn.Linear(4, 2), teacher=nn.Linear(4, 3), distillers={"r": d},
                        optimizer=lambda groups: torch.optim.SGD(groups, lr=0.1))
    batch = VectorData().example_batch()
    original = batch["x"].clone()
    task.build(batch)
    assert d.seen["models"]["student"] is task.student and d.seen["models"]["teacher"] is task.teacher.model
    losses, s = task.losses(batch)
    assert torch.equal(batch["x"], original) and "doubled" not in batch  # the caller's dict untouched
    assert torch.allclose(s.logits, task.student(2 * original))  # the student saw the doubled input
    assert d.seen["batch"]["doubled"]  # and the distiller the batch the student saw
    teacher_logits = task.teacher_outputs(batch).logits
    assert torch.allclose(teacher_logits, task.teacher.model(original))  # the teacher the clean one
    expected = torch.nn.functional.mse_loss(d.adapter(task.student(2 * original)), teacher_logits)
    assert losses["r"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses["task"].item() == pytest.approx(
        torch.nn.functional.mse_loss(task.student(2 * original), batch["y"]).item(), rel=1e-6)
    calls = []
    task.update_metrics = lambda stage, out, b: calls.append(torch.allclose(out.logits, task.student(original)))
    task.eval_step("val", batch)
    assert calls == [True]  # evaluation: the clean input
