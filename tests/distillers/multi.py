"""Several tiny teachers around one student, through the real ClassificationTask path."""

from __future__ import annotations

import functools

import torch

from kdkit.tasks.classification import ClassificationTask

from .helpers import image_batch, staged_net


def multi_task(distillers: dict, widths=(6, 8), seed: int = 0, **kwargs) -> ClassificationTask:
    """A student (width 4) and teachers ``t0, t1, ...`` (the given widths), 5 classes, built on
    one example batch like the runner's probe."""
    torch.manual_seed(seed)
    teachers = {f"t{i}": staged_net(w) for i, w in enumerate(widths)}
    task = ClassificationTask(staged_net(4), teachers=teachers, distillers=distillers, num_classes=5,
                              embedding_module="fc", teacher_embedding_module="fc",
                              optimizer=functools.partial(torch.optim.SGD, lr=0.1), **kwargs)
    task.build(image_batch(), num_samples=18, num_classes=5)
    return task


def backward(task: ClassificationTask, batch: dict) -> dict:
    """One training step's losses, backward of their sum."""
    task.train()
    losses, _ = task.losses(batch)
    torch.stack(list(losses.values())).sum().backward()
    return losses


def assert_only_student_and_distillers_learn(task: ClassificationTask) -> None:
    for name, p in task.student.named_parameters():
        assert p.grad is not None, f"student {name} got no gradient"
    for name, teacher in task.teachers.items():
        for pname, p in teacher.model.named_parameters():
            assert not p.requires_grad and p.grad is None, f"teacher {name}.{pname} must not learn"
