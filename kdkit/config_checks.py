"""Config values that cannot be meant, refused before anything is built or trained.

``distiller.kd.weight=-1`` trained a student that maximised the KD loss; ``trainer.max_epochs=0``
saved and reported an untrained teacher; ``lr=nan`` trained NaNs. Each such value is one line of
the error, naming the key and what would be valid.
"""

from __future__ import annotations

import math

from omegaconf import DictConfig

from kdkit.errors import KdkitError

# keys (the last part of a distiller's setting) that are softmax temperatures or scales: > 0
TEMPERATURE_KEYS = ("temperature", "teacher_temperature", "init_temperature", "tau")


PROGRAM_FORMATS = ("pt2", "onnx")  # kdkit.exports.program


def _number(value) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _positive(problems: list[str], key: str, value, allow_zero: bool = False) -> None:
    number = _number(value)
    if value is None:
        return
    if number is None:
        problems.append(f"{key}={value!r} is not a number")
    elif not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        problems.append(f"{key}={value} must be a finite number {'>= 0' if allow_zero else '> 0'}")


def _epochs(problems: list[str], key: str, value, max_steps) -> None:
    if value is None:
        return
    number = _number(value)
    if number is None or number != int(number):
        problems.append(f"{key}={value!r} must be a whole number of epochs >= 1")
    elif number == -1 and (_number(max_steps) or -1) > 0:
        return  # Lightning: no epoch limit, trainer.max_steps ends the fit
    elif number < 1:
        problems.append(f"{key}={value} must be >= 1 (a stage that never trains would save and "
                        "report an untrained model)")


def _lrs(problems: list[str], prefix: str, node) -> None:
    if isinstance(node, DictConfig) and "lr" in node:
        _positive(problems, f"{prefix}.lr", node.lr)


def config_problems(cfg: DictConfig) -> list[str]:
    """Every impossible value in ``cfg``, one message each (empty when all is well)."""
    problems: list[str] = []
    trainer = cfg.get("trainer") or {}
    max_steps = trainer.get("max_steps")
    _epochs(problems, "trainer.max_epochs", trainer.get("max_epochs"), max_steps)
    teachers = {"teacher": cfg.get("teacher") or {},
                **{f"teachers.{k}": v or {} for k, v in (cfg.get("teachers") or {}).items()}}
    for key, node in teachers.items():
        _epochs(problems, f"{key}.max_epochs", node.get("max_epochs"), max_steps)
        _lrs(problems, f"{key}.optimizer", node.get("optimizer"))
        if node.get("cache") and (node.get("labels") or (cfg.get("stages") or {}).get("teacher_labels")):
            problems.append(f"{key}.cache={node.get('cache')} with teacher labels (teacher.labels or "
                            "stages.teacher_labels): the labels file already holds every output; set "
                            f"{key}.cache=false")
        topk = node.get("labels_topk")
        if topk is not None and (_number(topk) is None or _number(topk) < 1 or _number(topk) != int(_number(topk))):
            problems.append(f"{key}.labels_topk={topk} must be a whole number >= 1 or null")
    baseline_epochs = (cfg.get("stages") or {}).get("baseline_max_epochs")
    if baseline_epochs != "equal_steps":
        _epochs(problems, "stages.baseline_max_epochs", baseline_epochs, max_steps)
    generations = (cfg.get("stages") or {}).get("generations")
    if generations is not None and (_number(generations) is None or _number(generations) < 1
                                    or _number(generations) != int(_number(generations))):
        problems.append(f"stages.generations={generations} must be a whole number >= 1")
    data = cfg.get("data") or {}
    for key in ("batch_size", "eval_batch_size"):
        value = data.get(key)
        number = _number(value)
        if value is not None and (number is None or number < 1 or number != int(number)):
            problems.append(f"data.{key}={value} must be a whole number >= 1")
    task = cfg.get("task") or {}
    _lrs(problems, "task.optimizer", task.get("optimizer"))
    _lrs(problems, "student.optimizer", (cfg.get("student") or {}).get("optimizer"))
    _positive(problems, "task.task_loss_weight", task.get("task_loss_weight"), allow_zero=True)
    for name, node in (cfg.get("distiller") or {}).items():
        if not isinstance(node, DictConfig):
            continue
        _positive(problems, f"distiller.{name}.weight", node.get("weight"))
        for key in TEMPERATURE_KEYS:
            _positive(problems, f"distiller.{name}.{key}", node.get(key))
    programs = (cfg.get("export") or {}).get("programs")
    unknown = [p for p in (programs or []) if p not in PROGRAM_FORMATS]
    if unknown:
        problems.append(f"export.programs={list(programs)}: unknown {unknown}; choose from {list(PROGRAM_FORMATS)}")
    return problems


def check_config(cfg: DictConfig) -> None:
    """Raise one KdkitError listing every impossible value (``; `` between them)."""
    problems = config_problems(cfg)
    if problems:
        raise KdkitError("; ".join(problems))
