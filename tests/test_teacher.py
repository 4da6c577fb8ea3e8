"""The teacher is frozen in one place, and stays frozen wherever the task goes."""

import lightning as L
import torch
from torch import nn

from kdkit.distillers.base import Distiller
from kdkit.tasks.classification import ClassificationTask
from kdkit.teacher import FrozenTeacher
from tests.helpers import BNNet, TinyNet, image_batch


class LogitMSE(Distiller):
    def forward(self, student, teacher, batch):
        return {"loss": (student.logits - teacher.logits).pow(2).mean()}


def make_task(teacher=None, **kwargs):
    return ClassificationTask(
        TinyNet(), teacher if teacher is not None else BNNet(), distillers={"mse": LogitMSE()},
        num_classes=3, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), **kwargs)


def test_frozen_teacher_has_no_grad_and_stays_in_eval():
    teacher = FrozenTeacher(BNNet())
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    out = teacher(torch.rand(2, 1, 8, 8))
    assert out.grad_fn is None and not out.requires_grad


def test_task_train_mode_does_not_reach_teacher_and_bn_stats_do_not_move():
    task = make_task()
    task.build(image_batch())
    running = task.teacher.model.bn.running_mean.clone()
    task.train()
    assert task.student.training and not task.teacher.training
    loss = task.training_step(image_batch(seed=1), 0)
    loss.backward()
    assert torch.equal(task.teacher.model.bn.running_mean, running)
    assert all(p.grad is None for p in task.teacher.parameters())
    assert all(p.grad is not None for p in task.student.parameters())


def test_teacher_absent_from_state_dict_parameters_and_optimizer():
    task = make_task()
    assert not any(k.startswith("teacher") or "_teacher" in k for k in task.state_dict())
    teacher_ids = {id(p) for p in task.teacher.parameters()}
    assert teacher_ids.isdisjoint(id(p) for p in task.parameters())
    opt = task.configure_optimizers()
    assert teacher_ids.isdisjoint(id(p) for g in opt.param_groups for p in g["params"])


def test_task_to_moves_teacher_too():
    task = make_task()
    task.to(torch.float64)
    assert next(task.teacher.parameters()).dtype == torch.float64


def test_teacher_runs_in_its_own_precision():
    task = make_task(teacher_precision="bf16")
    task.build(image_batch())
    out = task.teacher_outputs(image_batch())
    assert out.logits.dtype == torch.bfloat16
    assert task.student_outputs(image_batch()).logits.dtype == torch.float32


def test_checkpoint_holds_no_teacher(tmp_path):
    from tests.helpers import image_batch as batch_fn

    class DM(L.LightningDataModule):
        num_classes, num_train_samples = 3, 6

        def example_batch(self, n=4):
            return batch_fn(n)

        def train_dataloader(self):
            data = batch_fn(12)
            rows = [{k: v[i] for k, v in data.items()} for i in range(12)]
            return torch.utils.data.DataLoader(rows, batch_size=6)

    task = make_task()
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, enable_model_summary=False)
    trainer.fit(task, datamodule=DM())
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert state and all(k.startswith(("student.", "distillers.")) for k in state)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in task.student.modules())
    assert not any("bn" in k for k in state)  # the teacher's BN would show up here
