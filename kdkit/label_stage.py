"""The teacher-labels stage of a run (``stages.teacher_labels``) and ``teacher.labels`` files.

With ``stages.teacher_labels=true`` each teacher labels the student's training view once, after
the teacher stages, into ``<run>/teacher_labels/<name>.safetensors``; the student stage then reads
the file instead of running the teacher every step. A later run reads a file with
``teacher.labels=<path>`` (checked against its teacher's weights and its training data). See
``kdkit.teacher_labels`` for the file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import open_dict

from kdkit.errors import KdkitError, say
from kdkit.teacher_labels import TeacherLabels, data_description, write_teacher_labels


def labels_path(out: Path, name: str) -> Path:
    return out / "teacher_labels" / f"{name}.safetensors"


def write_stage_labels(cfg, datamodule, out: Path, task, teachers: dict, teacher_cfgs: dict) -> dict:
    """Label the current training view with every teacher (skipping a file this run already
    wrote that still fits) and return the teacher configs with ``labels`` pointing at the files.

    ``task``: a task holding the teachers (their input pipelines and the features the distillers
    tap). Under DDP every rank labels the data itself (no process group exists yet); the atomic
    write makes the identical files safe.
    """
    _require_pool(datamodule)
    device = "cuda" if torch.cuda.is_available() and cfg.trainer.get("accelerator") != "cpu" else "cpu"
    updated = dict(teacher_cfgs)
    try:
        for name, model in teachers.items():
            updated[name] = _label_with(cfg, datamodule, out, task, name, model, teacher_cfgs[name], device)
    finally:
        task.remove_taps()  # the writer's feature hooks must not stay on the shared teachers
        task.to("cpu")
    return updated


def _label_with(cfg, datamodule, out: Path, task, name: str, model, tcfg, device: str):
    path = labels_path(out, name)
    if not _still_fits(path, model, cfg, datamodule):
        say(f"teacher '{name}' labels the {len(datamodule.plain_train_view)} training samples once into {path}")
        write_teacher_labels(task, name, model, datamodule, cfg, path, tcfg.get("labels_topk"),
                             batch_size=int(cfg.data.get("eval_batch_size") or cfg.data.get("batch_size", 256)),
                             device=device)
    tcfg = tcfg.copy()
    with open_dict(tcfg):
        tcfg.labels = str(path)
    return tcfg


def open_labels(cfg, tcfg, model, datamodule, name: str) -> TeacherLabels:
    """The ``teacher.labels`` file of teacher ``name``, checked against this run (its teacher's
    weights and the current training view)."""
    return load_checked(tcfg.labels, model, cfg, datamodule)


def check_label_files(cfg, datamodule, teachers: dict, teacher_cfgs: dict) -> None:
    """Before any stage trains: every ``teacher.labels`` file exists, is a teacher-labels file
    and was written for the student's training data (and by the teacher, when its weights are
    already known; a teacher this run trains is checked when the student stage opens the file).
    ``teacher.cache`` together with labels is refused by ``kdkit.config_checks``."""
    for name, (model, trained) in teachers.items():
        if teacher_cfgs[name].get("labels"):
            load_checked(teacher_cfgs[name].labels, model if trained else None, cfg, datamodule)


def load_checked(path, model, cfg, datamodule) -> TeacherLabels:
    """Load the labels file at ``path`` and refuse it unless it was written for the current
    training view and (``model`` not None) by ``model``."""
    from kdkit.cache import weights_fingerprint

    _require_pool(datamodule)
    labels = TeacherLabels.load(path)
    labels.check_fits(None if model is None else weights_fingerprint(model), data_description(cfg, datamodule),
                      f"teacher.labels={path}")
    return labels


def _still_fits(path: Path, model, cfg, datamodule) -> bool:
    """Whether this run already wrote a labels file at ``path`` that still fits (a resumed run)."""
    if not path.is_file():
        return False
    try:
        load_checked(path, model, cfg, datamodule)
    except KdkitError:
        return False
    return True


def _require_pool(datamodule) -> None:
    if not hasattr(datamodule, "plain_train_view"):
        raise KdkitError(f"teacher labels need an image-classification datamodule (plain_train_view); "
                         f"{type(datamodule).__name__} has none")
    if getattr(datamodule, "mixes_samples", False):
        raise KdkitError("teacher labels hold one output per sample, but data.mixup_alpha / cutmix_alpha "
                         "make each training row a mixture of two: the teacher must see the mixed image "
                         "(drop teacher.labels / stages.teacher_labels, or the mixing)")
