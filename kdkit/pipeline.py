"""The stage runner behind ``kdkit-train``: teacher -> baseline -> distilled student.

Every stage is the same ``DistillationTask`` loop with different parts: the teacher stage trains
(or only evaluates) the teacher as if it were a student; the baseline trains the student with its
task loss alone; the student stage adds the distillers. Each stage writes ``stages/<name>.json``
when it completes, so ``ckpt_path=last`` on the same output directory skips finished stages and
resumes the interrupted one from its ``last.ckpt``.
"""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from kdkit.checkpoint_io import AtomicCheckpointIO
from kdkit.distributed import refuse_relaunch_in_sweep
from kdkit.errors import KdkitError

STAGES = ("teacher", "baseline", "student")


def run(cfg: DictConfig) -> dict[str, dict]:
    """Run every enabled stage of ``cfg``; return (and write) ``{stage: metrics}``."""
    if not cfg.paths.get("output_dir"):
        raise KdkitError("paths.output_dir is not set (kdkit-train and kdkit.compose set it)")
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_on_rank_zero(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "high"))

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    results: dict[str, dict] = {}

    teacher = None
    if cfg.stages.teacher or cfg.stages.student:
        teacher, teacher_results = teacher_stage(cfg, datamodule, out)
        if teacher_results is not None:
            results["teacher"] = teacher_results
    if cfg.stages.baseline:
        results["baseline"] = train_stage(cfg, datamodule, out, "baseline", teacher=None)
    if cfg.stages.student:
        results["student"] = train_stage(cfg, datamodule, out, "student", teacher=teacher)

    _write_on_rank_zero(out / "results.json", json.dumps(results, indent=2))
    _print_table(results, cfg.get("name", "kdkit"))
    return results


# ---- stages -------------------------------------------------------------------------------
def teacher_stage(cfg, datamodule, out: Path):
    """The teacher model, trained here unless weights are given; and its test results."""
    from kdkit.checkpoints import load_weights

    model = instantiate(cfg.teacher.model)
    saved = out / "teacher.pt"
    if cfg.teacher.get("ckpt_path"):
        load_weights(model, cfg.teacher.ckpt_path)
    elif cfg.teacher.get("pretrained"):
        pass  # the model factory already loaded trained weights (hub or local)
    elif _done(out, "teacher") and saved.exists():
        load_weights(model, saved)
    else:
        task = make_task(cfg, student=model, role_of_student="teacher")
        results = fit_and_test(cfg, task, datamodule, out, "teacher", train=True,
                               evaluate=cfg.stages.teacher, max_epochs=cfg.teacher.get("max_epochs"))
        _save_on_rank_zero(model.state_dict(), saved)
        return model, results
    if not cfg.stages.teacher:
        return model, None
    if _done(out, "teacher"):
        return model, _load_stage(out, "teacher")
    task = make_task(cfg, student=model, role_of_student="teacher")
    return model, fit_and_test(cfg, task, datamodule, out, "teacher", train=False)


def train_stage(cfg, datamodule, out: Path, stage: str, teacher) -> dict:
    if _done(out, stage):
        return _load_stage(out, stage)
    L.seed_everything(cfg.seed, workers=True)  # baseline and student start from the same init
    student = instantiate(cfg.student.model)
    distillers = {}
    if stage == "student":
        distillers = {name: instantiate(node) for name, node in (cfg.get("distiller") or {}).items()}
        if not distillers:
            raise KdkitError("the student stage has no distillers: pick some with distiller=[kd,...]")
    task = make_task(cfg, student=student, teacher=teacher if distillers else None,
                     distillers=distillers, datamodule=datamodule)
    results = fit_and_test(cfg, task, datamodule, out, stage, train=True)
    if stage == "student" and rank_zero_only.rank == 0:
        task.export(out / "export", with_adapters=cfg.export.adapters)
    return results


def make_task(cfg, student, teacher=None, distillers=None, role_of_student: str = "student",
              datamodule=None):
    """Instantiate ``cfg.task`` (a partial) around the given models."""
    kwargs = dict(
        student=student,
        # task.task_loss_weight is the mixing weight of the *distilled* objective; a model
        # trained alone (teacher, baseline) always learns from its task loss.
        **({} if distillers else {"task_loss_weight": 1.0}),
        teacher=teacher,
        distillers=distillers or {},
        teacher_precision=cfg.teacher.get("precision"),
        student_normalize=_container(cfg[role_of_student].get("normalize")),
        teacher_normalize=_container(cfg.teacher.get("normalize")),
    )
    if teacher is not None and cfg.teacher.get("cache"):
        from kdkit.cache import build_teacher_cache

        kwargs["teacher_cache"] = build_teacher_cache(cfg, teacher, datamodule)
    task_cfg = cfg.task
    own = cfg[role_of_student].get("optimizer")
    if own:  # <role>.optimizer: this model's own optimizer settings (e.g. a student's weight decay)
        task_cfg = OmegaConf.merge(cfg.task, {"optimizer": own})
    task = instantiate(task_cfg)(**kwargs)
    task.student_role = role_of_student
    return task


def make_trainer(cfg, out: Path, stage: str, max_epochs=None) -> L.Trainer:
    callbacks = [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node]
    if not cfg.trainer.get("enable_progress_bar", True):  # one switch turns every bar off
        callbacks = [cb for cb in callbacks if not isinstance(cb, ProgressBar)]
    for cb in callbacks:
        if isinstance(cb, ModelCheckpoint):
            cb.dirpath = str(out / "checkpoints" / stage)
    loggers = [instantiate(node, stage=stage) for node in (cfg.get("logger") or {}).values()]
    overrides = {"max_epochs": max_epochs} if max_epochs else {}
    if not any(isinstance(cb, ModelCheckpoint) for cb in callbacks) and "enable_checkpointing" not in cfg.trainer:
        # Without a configured ModelCheckpoint (callbacks=none) Lightning would add its own and
        # write a checkpoint every epoch: 12 of 70 s (17%) of a cProfiled cora_glnn run.
        overrides["enable_checkpointing"] = False
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(out),
        **overrides,
    )
    refuse_relaunch_in_sweep(trainer)
    for logger in loggers:  # W&B and CSV get the whole resolved config once per stage
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return trainer


def fit_and_test(cfg, task, datamodule, out: Path, stage: str, train: bool,
                 evaluate: bool = True, max_epochs=None) -> dict | None:
    """Train (optionally) and test one stage with one Trainer, so its logs stay in one place.

    Returns the stage's results (test metrics as logged + ``task.inference_report``), also
    written to ``stages/<stage>.json``; None when ``evaluate`` is false.
    """
    trainer = make_trainer(cfg, out, stage, max_epochs)
    results: dict = {}
    if train:
        start = time.perf_counter()
        trainer.fit(task, datamodule=datamodule, ckpt_path=_resume_from(cfg, out, stage))
        results["fit_seconds"] = round(time.perf_counter() - start, 1)
        # the last validation metrics: for choosing settings without looking at the test set
        results.update({k: float(v) for k, v in trainer.callback_metrics.items()
                        if k.startswith("val/") and v.numel() == 1})
    if not evaluate:
        _finish_wandb(trainer)
        return None
    metrics = trainer.test(task, datamodule=datamodule, verbose=False)[0]
    results = {**{k: float(v) for k, v in metrics.items()},
               **task.fit_summary(), **task.inference_report(_latency_batch(cfg, datamodule)),
               **results}
    _write_on_rank_zero(out / "stages" / f"{stage}.json", json.dumps(results, indent=2))
    _finish_wandb(trainer)
    return results


def _finish_wandb(trainer) -> None:
    """End this stage's W&B run; wandb would otherwise log every later stage into it."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        import wandb

        wandb.finish()


def _resume_from(cfg, out: Path, stage: str) -> str | None:
    last = out / "checkpoints" / stage / "last.ckpt"
    if cfg.get("ckpt_path") == "last":
        return str(last) if last.exists() else None
    if cfg.get("ckpt_path"):
        if not Path(cfg.ckpt_path).exists():
            raise KdkitError(f"ckpt_path not found: {cfg.ckpt_path}")
        return cfg.ckpt_path
    return None


# ---- helpers ------------------------------------------------------------------------------
def _latency_batch(cfg, datamodule) -> dict:
    params = inspect.signature(datamodule.example_batch).parameters
    size = cfg.get("report", {}).get("latency_batch_size")
    return datamodule.example_batch(n=size) if size and "n" in params else datamodule.example_batch()


def _container(node):
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _done(out: Path, stage: str) -> bool:
    return (out / "stages" / f"{stage}.json").exists()


def _load_stage(out: Path, stage: str) -> dict:
    return json.loads((out / "stages" / f"{stage}.json").read_text())


@rank_zero_only
def _write_on_rank_zero(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


@rank_zero_only
def _save_on_rank_zero(state: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


@rank_zero_only
def _print_table(results: dict, title: str) -> None:
    from rich.console import Console

    from kdkit.report import format_table

    Console().print(format_table(results, title=title))
