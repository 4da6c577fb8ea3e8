"""How a task's parts are wired together: its teachers by name, which teacher each distiller
reads, per-teacher options (precision, cache, input pipeline), the task-loss weight rule and the
callbacks it brings. Every check here fails when the task is built, with the names to use."""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
from torch import nn

from kdkit.distillers.base import Distiller
from kdkit.errors import KdkitError


def resolve_task_loss_weight(weight: float | None, has_distillers: bool, default: float) -> float:
    """The task loss weight a task trains with: ``weight`` (None: ``default``) next to
    distillers; 1 without distillers (a model trained alone learns from its task loss)."""
    if not has_distillers:
        return 1.0
    return float(default if weight is None else weight)


def callback_list(callbacks) -> list[L.Callback]:
    if callbacks is None:
        return []
    items = list(callbacks.values()) if isinstance(callbacks, Mapping) else list(callbacks)
    items = [cb for cb in items if cb is not None]
    for cb in items:
        if not isinstance(cb, L.Callback):
            raise KdkitError(f"task.callbacks: {cb!r} is not a Lightning Callback")
    return items


def teacher_models(teacher, teachers) -> dict[str, nn.Module]:
    models = dict(teachers or {})
    if teacher is not None:
        if "teacher" in models:
            raise KdkitError("a teacher named 'teacher' is given twice (teacher= and teachers=)")
        models = {"teacher": teacher, **models}
    for name in models:
        check_teacher_name(name)
    return models


def check_teacher_name(name: str) -> None:
    """Teacher names key buffers, stage names and results: a Python identifier, not 'student'."""
    if not isinstance(name, str) or not name.isidentifier() or name == "student":
        raise KdkitError(f"teacher name {name!r}: use a Python identifier other than 'student' "
                         "(letters, digits and _, e.g. teachers.gcn)")


def per_teacher(value, teachers: Mapping, what: str) -> dict:
    """``value`` for every teacher: a mapping name -> value, or one value for the only teacher."""
    if isinstance(value, Mapping) and not hasattr(value, "lookup"):
        unknown = set(value) - set(teachers)
        if unknown:
            raise KdkitError(f"{what} names unknown teachers {sorted(unknown)}; teachers: {list(teachers)}")
        return {name: value.get(name) for name in teachers}
    if value is not None and len(teachers) > 1:
        raise KdkitError(f"{what}: one value for {len(teachers)} teachers; give {{name: value}}")
    return {name: value for name in teachers}


def input_options(inputs, teachers: Mapping, student_normalize, teacher_normalize) -> dict[str, dict]:
    options = {role: dict(opts or {}) for role, opts in (inputs or {}).items()}
    unknown = set(options) - {"student", *teachers}
    if unknown:
        raise KdkitError(f"inputs for unknown models {sorted(unknown)}: roles are student, {', '.join(teachers)}")
    options.setdefault("student", {})
    if student_normalize is not None:
        options["student"]["normalize"] = student_normalize
    for name in teachers:
        options.setdefault(name, {})
        if teacher_normalize is not None and options[name].get("normalize") is None:
            options[name]["normalize"] = teacher_normalize
    return options


def route(distiller: str, d: Distiller, teachers: list[str]) -> list[str]:
    """The teachers distiller ``distiller`` reads, checked against ``teachers``."""
    listing = ", ".join(teachers) or "none"
    if d.reads_several_teachers:
        names = d.teacher_names if d.teacher_names is not None else teachers
        unknown = [n for n in names if n not in teachers]
        if unknown:
            raise KdkitError(f"distiller '{distiller}' reads teachers {unknown}, which this run does "
                             f"not have; its teachers: {listing}")
        return list(names)
    if d.teacher_name is not None:
        if d.teacher_name not in teachers:
            raise KdkitError(f"distiller '{distiller}' reads teacher '{d.teacher_name}', which this run "
                             f"does not have; its teachers: {listing}")
        return [d.teacher_name]
    if len(teachers) > 1:
        raise KdkitError(f"distiller '{distiller}' reads one teacher but this run has {len(teachers)} "
                         f"({listing}): set distiller.{distiller}.teacher=<name>")
    return list(teachers[:1])


def label(role: str, teachers: Mapping) -> str:
    """How messages name a model: "student", "teacher", or "teacher 'gcn'" among several."""
    if role == "student" or role not in teachers:
        return role
    return "teacher" if role == "teacher" else f"teacher '{role}'"
