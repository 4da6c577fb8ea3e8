"""A schedule of teachers: one distiller reads teacher 1, then teacher 2, ... (progressive
distillation)."""

from __future__ import annotations

import copy

from torch import Tensor

from kdkit.distillers.base import Distiller, MultiTeacherDistiller
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs


class TeacherSchedule(MultiTeacherDistiller):
    """Progressive distillation through a sequence of teachers, as in PROD's teacher-progressive
    stage (Lin et al., "PROD: Progressive Distillation for Dense Retrieval", WWW 2023): the
    student first learns from a teacher close to it, then from stronger ones, each for a span of
    training. Any one-teacher distiller does the learning; this one only decides, at every
    training step, which teacher it reads, and only that teacher runs:

        teacher(e) = teachers[j]  for  switch_at[j-1] <= e < switch_at[j]

    with ``e`` the epoch (or the optimizer step, ``unit: step``). The inner distiller is built
    once, on the first teacher's outputs; its adapters must fit every scheduled teacher
    (checked at start-up).

    Args:
        distiller: the one-teacher distiller applied to the current teacher (its own ``weight``
            is ignored: this distiller's ``weight`` applies).
        teachers: teacher names in the order they teach (at least 2).
        switch_at: epochs (or steps) at which the next teacher takes over, increasing, one fewer
            than ``teachers``.
        unit: "epoch" or "step".
        weight: multiplier of the loss.
    """

    needs_several_teachers = True  # refused where only one teacher exists (born-again)

    def __init__(self, distiller: Distiller, teachers, switch_at, unit: str = "epoch", weight: float = 1.0):
        super().__init__(weight, teachers)
        if not isinstance(distiller, Distiller) or distiller.reads_several_teachers:
            raise KdkitError("teacher_schedule.distiller must be a one-teacher distiller (e.g. kd)")
        if not self.teacher_names or len(self.teacher_names) < 2:
            raise KdkitError("teacher_schedule.teachers: list at least two teachers, in teaching order")
        switch_at = [int(s) for s in switch_at]
        if len(switch_at) != len(self.teacher_names) - 1 or switch_at != sorted(set(switch_at)) or min(switch_at) < 1:
            raise KdkitError(f"teacher_schedule.switch_at={switch_at}: give {len(self.teacher_names) - 1} "
                             "increasing positive epochs/steps, one per hand-over")
        if unit not in ("epoch", "step"):
            raise KdkitError(f"teacher_schedule.unit={unit!r}: use epoch or step")
        self.inner = distiller
        self.switch_at, self.unit = switch_at, unit

    @property
    def student_features(self) -> list[str]:
        return self.inner.student_features

    @property
    def teacher_features(self) -> list[str]:
        return self.inner.teacher_features

    def current(self) -> str:
        """The teacher that teaches at the current progress."""
        now = self.progress[0] if self.unit == "epoch" else self.progress[1]
        return self.teacher_names[sum(now >= s for s in self.switch_at)]

    def teachers_for_step(self, names: list[str]) -> list[str]:
        return [self.current()]

    def build(self, student: Outputs, teachers: dict[str, Outputs], context) -> None:
        # The inner distiller (and its adapters) is built once; built on each teacher apart, it
        # must come out the same, or the later teachers would not fit it.
        shapes = {}
        for name, teacher in teachers.items():
            trial = copy.deepcopy(self.inner)
            trial.build(student, teacher, context)
            shapes[name] = {k: tuple(v.shape) for k, v in trial.state_dict().items()}
        if any(s != shapes[self.teacher_names[0]] for s in shapes.values()):
            raise KdkitError(f"teacher_schedule: the inner distiller's adapters differ in shape between "
                             f"the scheduled teachers {shapes}; it is built once for all of them")
        self.inner.build(student, teachers[self.teacher_names[0]], context)

    def forward(self, student: Outputs, teachers: dict[str, Outputs], batch: dict) -> dict[str, Tensor]:
        (teacher,) = teachers.values()  # the task passes only the current one while training
        return self.inner(student, teacher, batch)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, teachers={self.teacher_names}, switch_at={self.switch_at} ({self.unit}s)"
