"""The stage runner behind ``kdkit-train``: teacher -> baseline -> distilled student.

Every stage is the same ``DistillationTask`` loop with different parts: the teacher stage trains
(or only evaluates) the teacher as if it were a student; the baseline trains the student with its
task loss alone; the student stage adds the distillers. Each stage writes ``stages/<name>.json``
when it completes, so ``ckpt_path=last`` on the same output directory skips finished stages and
resumes the interrupted one from its newest checkpoint (``kdkit.checkpointing``).

Before any stage trains, the run is checked: impossible config values, a resumed run's settings
against the interrupted one's, and every stage's task built and run on one example batch (models,
feature taps, adapters, distillers). Everything is seeded from ``cfg.seed``, the teacher included.
"""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import get_method, instantiate
from lightning.pytorch.callbacks import Checkpoint, ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from kdkit.checkpoint_io import AtomicCheckpointIO, save_atomically, safe_load
from kdkit.checkpointing import ResumePoint, find_resume_point
from kdkit.config_checks import check_config
from kdkit.data_facts import fill_data_facts
from kdkit.distributed import refuse_relaunch_in_sweep, warn_if_oversubscribed
from kdkit.divergence import DivergenceError, check_finite
from kdkit.errors import KdkitError, say, unreadable
from kdkit.resume import check_resume_config

STAGES = ("teacher", "baseline", "student")


def run(cfg: DictConfig) -> dict[str, dict]:
    """Run every enabled stage of ``cfg``; return (and write) ``{stage: metrics}``."""
    if not cfg.paths.get("output_dir"):
        raise KdkitError("paths.output_dir is not set (kdkit-train and kdkit.compose set it)")
    check_config(cfg)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.get("ckpt_path") == "last":
        check_resume_config(out, cfg)
    _write_on_rank_zero(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "high"))

    L.seed_everything(cfg.seed, workers=True)  # data splits and the teacher's init depend on it
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    fill_data_facts(cfg, datamodule)  # class/feature counts the config leaves to the data
    results: dict[str, dict] = {}

    teacher, trained = None, False
    if cfg.stages.teacher or cfg.stages.student:
        teacher, trained = load_teacher(cfg, out)
    check_before_training(cfg, datamodule, teacher)
    if teacher is not None:
        teacher_results = teacher_stage(cfg, datamodule, out, teacher, trained)
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
def load_teacher(cfg, out: Path):
    """The teacher network and whether it already has trained weights.

    Weights come from ``teacher.ckpt_path`` (loaded with ``weights_only=True`` unless
    ``teacher.trust_checkpoint``), from the model factory (``teacher.pretrained``), or from this
    run directory's ``teacher.pt`` when its stage finished before; otherwise it is trained.
    """
    from kdkit.checkpoints import load_weights

    model = instantiate(cfg.teacher.model)
    trust = bool(cfg.teacher.get("trust_checkpoint", False))
    if cfg.teacher.get("ckpt_path"):
        load_weights(model, cfg.teacher.ckpt_path, trust=trust)
        return model, True
    if cfg.teacher.get("pretrained"):
        return model, True  # the model factory already loaded trained weights (hub or local)
    saved = out / "teacher.pt"
    if _done(out, "teacher") and saved.exists():
        load_weights(model, saved, what="this run's teacher.pt")
        return model, True
    return model, False


def teacher_stage(cfg, datamodule, out: Path, model, trained: bool) -> dict | None:
    """Train ``model`` unless ``trained``, then test it; the teacher's results (None when
    ``stages.teacher`` is off)."""
    if not trained:
        L.seed_everything(cfg.seed, workers=True)  # the teacher trains the same way every run
        task = make_task(cfg, student=model, role_of_student="teacher")
        results = fit_and_test(cfg, task, datamodule, out, "teacher", train=True,
                               evaluate=cfg.stages.teacher, max_epochs=cfg.teacher.get("max_epochs"))
        check_finite(model, "the trained teacher")
        if rank_zero_only.rank == 0:
            save_atomically(model.state_dict(), out / "teacher.pt")
        return results
    if not cfg.stages.teacher:
        return None
    if _done(out, "teacher"):
        return _load_stage(out, "teacher")
    task = make_task(cfg, student=model, role_of_student="teacher")
    return fit_and_test(cfg, task, datamodule, out, "teacher", train=False)


def check_before_training(cfg, datamodule, teacher) -> None:
    """Build every task the run's stages will train, and probe each on one example batch.

    A wrong feature name, a shape no adapter fits, a class-count mismatch or a bad distiller
    setting fails here, in seconds, instead of after the teacher and the baseline have trained.
    """
    trainable = [(p, p.requires_grad) for p in teacher.parameters()] if teacher is not None else []
    modes = [(m, m.training) for m in teacher.modules()] if teacher is not None else []
    tasks = []
    if teacher is not None and cfg.stages.teacher:
        tasks.append(make_task(cfg, student=teacher, role_of_student="teacher", probe=True))
    if cfg.stages.baseline or cfg.stages.student:
        distillers = make_distillers(cfg) if cfg.stages.student else {}
        tasks.append(make_task(cfg, student=instantiate(cfg.student.model),
                               teacher=teacher if distillers else None, distillers=distillers,
                               probe=True))
    try:
        for task in tasks:
            task.probe(datamodule)
    finally:  # the student stage's probe froze the teacher in place; its own stage may train it
        for param, flag in trainable:
            param.requires_grad_(flag)
        for module, training in modes:
            module.training = training


def make_distillers(cfg) -> dict:
    distillers = {name: instantiate(node) for name, node in (cfg.get("distiller") or {}).items()}
    if not distillers:
        raise KdkitError("the student stage has no distillers: pick some with distiller=[kd,...]")
    return distillers


def train_stage(cfg, datamodule, out: Path, stage: str, teacher) -> dict:
    if _done(out, stage):
        return _load_stage(out, stage)
    L.seed_everything(cfg.seed, workers=True)  # baseline and student start from the same init
    student = instantiate(cfg.student.model)
    distillers = make_distillers(cfg) if stage == "student" else {}
    task = make_task(cfg, student=student, teacher=teacher if distillers else None,
                     distillers=distillers, datamodule=datamodule)
    results = fit_and_test(cfg, task, datamodule, out, stage, train=True)
    if stage == "student":
        check_finite(task, "the distilled student")
        if rank_zero_only.rank == 0:
            task.export(out / "export", with_adapters=cfg.export.adapters)
    return results


def make_task(cfg, student, teacher=None, distillers=None, role_of_student: str = "student",
              datamodule=None, probe: bool = False):
    """Instantiate ``cfg.task`` (a partial) around the given models.

    ``probe``: a task only to be probed (``check_before_training``): no teacher cache is
    built and nothing is compiled.
    """
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
    if probe:
        kwargs["compile"] = False
    if teacher is not None and cfg.teacher.get("cache") and not probe:
        from kdkit.cache import build_teacher_cache

        kwargs["teacher_cache"] = build_teacher_cache(cfg, teacher, datamodule)
    task_cfg = cfg.task
    own = cfg[role_of_student].get("optimizer")
    if own:  # <role>.optimizer: this model's own optimizer settings (e.g. a student's weight decay)
        task_cfg = OmegaConf.merge(cfg.task, {"optimizer": own})
    task = instantiate(task_cfg)(**kwargs)
    task.student_role = role_of_student
    return task


def make_trainer(cfg, out: Path, stage: str, max_epochs=None, resume_at=None) -> L.Trainer:
    """The stage's Trainer: its callbacks and loggers, checkpoints under ``checkpoints/<stage>``.

    ``resume_at``: ``(epoch, global_step)`` of the checkpoint the stage resumes from, for the
    loggers that continue their files (``kdkit.csv_logger``).
    """
    callbacks = [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node]
    if not cfg.trainer.get("enable_progress_bar", True):  # one switch turns every bar off
        callbacks = [cb for cb in callbacks if not isinstance(cb, ProgressBar)]
    for cb in callbacks:
        if isinstance(cb, Checkpoint) and hasattr(cb, "dirpath"):
            cb.dirpath = str(out / "checkpoints" / stage)
    loggers = [instantiate(node, stage=stage, **_resume_kwargs(node, resume_at))
               for node in (cfg.get("logger") or {}).values()]
    overrides = {"max_epochs": max_epochs} if max_epochs else {}
    if not any(isinstance(cb, Checkpoint) for cb in callbacks) and "enable_checkpointing" not in cfg.trainer:
        # Without a configured checkpoint callback (callbacks=none) Lightning would add its own and
        # write a checkpoint every epoch: 12 of 70 s (17%) of a cProfiled cora_glnn run.
        overrides["enable_checkpointing"] = False
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[AtomicCheckpointIO()],
        # per stage: Lightning's SLURM requeue writes hpc_ckpt_<n>.ckpt there and restores the
        # newest one found there, which must be this stage's own
        default_root_dir=str(out / "checkpoints" / stage),
        **overrides,
    )
    refuse_relaunch_in_sweep(trainer)
    warn_if_oversubscribed(trainer)
    for logger in loggers:  # W&B and CSV get the whole resolved config once per stage
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return trainer


def _resume_kwargs(node, resume_at) -> dict:
    """``{"resume_at": ...}`` for logger factories that take it (they continue their files)."""
    if resume_at is None:
        return {}
    factory = get_method(node["_target_"])
    return {"resume_at": resume_at} if "resume_at" in inspect.signature(factory).parameters else {}


def fit_and_test(cfg, task, datamodule, out: Path, stage: str, train: bool,
                 evaluate: bool = True, max_epochs=None) -> dict | None:
    """Train (optionally) and test one stage with one Trainer, so its logs stay in one place.

    Returns the stage's results (test metrics as logged + ``task.inference_report``), also
    written to ``stages/<stage>.json``; None when ``evaluate`` is false.
    """
    resume = _resume_point(cfg, out, stage) if train else None
    trainer = make_trainer(cfg, out, stage, max_epochs,
                           resume_at=(resume.epoch, resume.global_step) if resume else None)
    results: dict = {}
    if train:
        start = time.perf_counter()
        try:
            trainer.fit(task, datamodule=datamodule, ckpt_path=str(resume.path) if resume else None)
        except DivergenceError as err:
            raise DivergenceError(f"stage '{stage}' {err}") from None
        except SIGTERMException:
            say(f"stage '{stage}' stopped by SIGTERM; resume with the same command and ckpt_path=last")
            raise SystemExit(143) from None
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


def _resume_point(cfg, out: Path, stage: str) -> ResumePoint | None:
    """The checkpoint ``stage`` resumes from (saying which in one line), or None."""
    if cfg.get("ckpt_path") == "last":
        directory = out / "checkpoints" / stage
        point = find_resume_point(directory)
        if point is None:
            say(f"ckpt_path=last: no checkpoint of stage '{stage}' in {directory}; starting it from the beginning")
        else:
            say(f"resuming stage '{stage}' from {point.path} (after epoch {point.epoch}, step {point.global_step})")
        return point
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path).expanduser()
        ckpt = safe_load(path, "ckpt_path", mmap=True)
        if not isinstance(ckpt, dict) or "global_step" not in ckpt:
            raise KdkitError(f"ckpt_path {path} is not a Lightning checkpoint of a kdkit stage")
        return ResumePoint(path, int(ckpt.get("epoch", 0)), int(ckpt["global_step"]))
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
    path = out / "stages" / f"{stage}.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise unreadable(path, f"the results of the finished stage '{stage}'", err,
                         f"delete it to run stage '{stage}' again") from None
    if not isinstance(results, dict):
        raise unreadable(path, f"the results of the finished stage '{stage}'", "not a JSON object",
                         f"delete it to run stage '{stage}' again")
    return results


@rank_zero_only
def _write_on_rank_zero(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


@rank_zero_only
def _print_table(results: dict, title: str) -> None:
    from rich.console import Console

    from kdkit.report import format_table

    Console().print(format_table(results, title=title))
