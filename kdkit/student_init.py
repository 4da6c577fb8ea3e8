"""The student network of a run: built from ``cfg.student.model``, optionally started from a
teacher's own weights (``student.init``, weight inheritance: ``kdkit.models.inherit``).

    student:
      init:              # null: the model's own initialisation
        teacher: null    # the teacher to inherit from (a name in `teachers`; null: the only one)
        blocks: every    # teacher blocks kept, evenly spaced, or a list such as [0, 2, 5]
        width: first     # a narrower student takes the leading slices (whole heads) of each tensor

The baseline and the distilled student inherit alike, so the distillers are compared from the
same start; the teacher is the trained one (each teacher's stage runs first).
"""

from __future__ import annotations

from collections.abc import Mapping

from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from kdkit.errors import KdkitError, say


def make_student(cfg, teachers: Mapping[str, nn.Module] | None = None, announce: bool = False) -> nn.Module:
    """``cfg.student.model`` instantiated, then inheriting from a teacher when ``student.init``
    asks (``teachers``: name -> network). ``announce``: print which tensors were inherited."""
    student = instantiate(cfg.student.model)
    init = cfg.student.get("init")
    if not init:
        return student
    options = OmegaConf.to_container(init, resolve=True) if OmegaConf.is_config(init) else dict(init)
    name = options.pop("teacher", None)
    teacher = _teacher(name, teachers or {})
    from kdkit.models.inherit import inherit

    report = inherit(student, teacher, **options)
    if announce:
        say(f"student.init: {report}")
    return student


def _teacher(name, teachers: Mapping[str, nn.Module]) -> nn.Module:
    if not teachers:
        raise KdkitError("student.init inherits a teacher's weights, but this run has no teacher: "
                         "set teacher=... (its stage trains it first) or student.init=null")
    if name is None:
        if len(teachers) > 1:
            raise KdkitError(f"student.init.teacher: say which teacher to inherit from ({', '.join(teachers)})")
        return next(iter(teachers.values()))
    if name not in teachers:
        raise KdkitError(f"student.init.teacher={name!r} is not a teacher of this run ({', '.join(teachers)})")
    return teachers[name]
