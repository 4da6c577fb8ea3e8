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
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdkit.checkpoint_io import AtomicCheckpointIO, save_atomically, safe_load
from kdkit.checkpointing import ResumePoint, find_resume_point
from kdkit.config_checks import check_config
from kdkit.data_facts import fill_data_facts
from kdkit.distributed import refuse_relaunch_in_sweep, warn_if_oversubscribed
from kdkit.divergence import DivergenceError, check_finite
from kdkit.errors import KdkitError, say, unreadable
from kdkit.resume import check_resume_config
from kdkit.teachers import SHORTHAND, make_distillers, results_key, stage_name, teacher_configs, weights_file

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

    teacher_cfgs = teacher_configs(cfg)
    if cfg.stages.student and not teacher_cfgs:
        raise KdkitError("the student stage needs a teacher: set teacher=<one of conf/teacher> or "
                         "+teacher@teachers.<name>=<...>, or stages.student=false")
    teachers: dict[str, tuple] = {}  # name -> (model, has trained weights)
    if cfg.stages.teacher or cfg.stages.student:
        teachers = {name: load_teacher(cfg, tcfg, out, name) for name, tcfg in teacher_cfgs.items()}
    check_before_training(cfg, datamodule, teachers, teacher_cfgs)
    for name, (model, trained) in teachers.items():
        teacher_results = teacher_stage(cfg, teacher_cfgs[name], name, datamodule, out, model, trained)
        if teacher_results is not None:
            results[results_key(name)] = teacher_results
    if cfg.stages.baseline:
        results["baseline"], _ = train_stage(cfg, datamodule, out, "baseline")
        warn_weaker_teachers(results)
    if cfg.stages.student:
        models = {name: model for name, (model, _) in teachers.items()}
        results["student"], student = train_stage(cfg, datamodule, out, "student", models, teacher_cfgs)
        for k in range(2, generations(cfg) + 1):  # born-again: student k-1 teaches student k
            results[f"student/gen{k}"], student = train_stage(
                cfg, datamodule, out, f"student-gen{k}", {f"gen{k - 1}": student}, {f"gen{k - 1}": cfg.student})

    _write_on_rank_zero(out / "results.json", json.dumps(results, indent=2))
    _print_table(results, cfg.get("name", "kdkit"))
    return results


# ---- stages -------------------------------------------------------------------------------
def load_teacher(cfg, tcfg, out: Path, name: str = SHORTHAND):
    """Teacher ``name``'s network and whether it already has trained weights.

    Weights come from its ``ckpt_path`` (loaded with ``weights_only=True`` unless its
    ``trust_checkpoint``), from the model factory (``pretrained``), or from this run
    directory's ``teacher[-<name>].pt`` when its stage finished before; otherwise it is trained.
    """
    from kdkit.checkpoints import load_weights

    model = instantiate(tcfg.model)
    trust = bool(tcfg.get("trust_checkpoint", False))
    if tcfg.get("ckpt_path"):
        load_weights(model, tcfg.ckpt_path, trust=trust)
        return model, True
    if tcfg.get("pretrained"):
        return model, True  # the model factory already loaded trained weights (hub or local)
    saved = out / weights_file(name)
    if _done(out, stage_name(name)) and saved.exists():
        load_weights(model, saved, what=f"this run's {saved.name}")
        return model, True
    return model, False


def teacher_stage(cfg, tcfg, name: str, datamodule, out: Path, model, trained: bool) -> dict | None:
    """Train teacher ``name`` unless ``trained``, then test it; its results (None when
    ``stages.teacher`` is off)."""
    stage = stage_name(name)
    if not trained:
        L.seed_everything(cfg.seed, workers=True)  # the teacher trains the same way every run
        task = make_task(cfg, student=model, role_of_student="teacher", student_cfg=tcfg)
        results = fit_and_test(cfg, task, datamodule, out, stage, train=True,
                               evaluate=cfg.stages.teacher, max_epochs=tcfg.get("max_epochs"))
        check_finite(model, f"the trained {stage}")
        if rank_zero_only.rank == 0:
            save_atomically(model.state_dict(), out / weights_file(name))
        return results
    if not cfg.stages.teacher:
        return None
    if _done(out, stage):
        return _load_stage(out, stage)
    task = make_task(cfg, student=model, role_of_student="teacher", student_cfg=tcfg)
    return fit_and_test(cfg, task, datamodule, out, stage, train=False, validate=bool(cfg.stages.baseline))


def check_before_training(cfg, datamodule, teachers: dict, teacher_cfgs: dict) -> None:
    """Build every task the run's stages will train, and probe each on one example batch.

    Every teacher (its own pipeline and taps), the student, every distiller and adapter and,
    with born-again generations, a student taught by a student: a wrong feature name, a shape
    no adapter fits, a class-count mismatch, an unknown teacher name or a bad distiller setting
    fails here, in seconds, instead of after the teachers and the baseline have trained.
    """
    models = {name: model for name, (model, _) in teachers.items()}
    trainable = [(p, p.requires_grad) for m in models.values() for p in m.parameters()]
    modes = [(m, m.training) for model in models.values() for m in model.modules()]
    tasks = []
    for name, (model, trained) in teachers.items():
        if cfg.stages.teacher or not trained:
            tasks.append(make_task(cfg, student=model, role_of_student="teacher",
                                   student_cfg=teacher_cfgs[name], probe=True))
    if cfg.stages.baseline or cfg.stages.student:
        distillers = make_distillers(cfg) if cfg.stages.student else {}
        tasks.append(make_task(cfg, student=instantiate(cfg.student.model),
                               teachers=models if distillers else None, distillers=distillers,
                               teacher_cfgs=teacher_cfgs, probe=True))
    if cfg.stages.student and generations(cfg) > 1:
        tasks.append(make_task(cfg, student=instantiate(cfg.student.model),
                               teachers={"gen1": instantiate(cfg.student.model)},
                               distillers=_unrouted(make_distillers(cfg)),
                               teacher_cfgs={"gen1": cfg.student}, probe=True))
    try:
        for task in tasks:
            task.probe(datamodule)
    finally:  # the student stage's probe froze the teachers in place; their own stages may train them
        for param, flag in trainable:
            param.requires_grad_(flag)
        for module, training in modes:
            module.training = training


def generations(cfg) -> int:
    """``stages.generations``: how many students are trained in sequence (born-again)."""
    value = cfg.stages.get("generations", 1)
    value = 1 if value is None else value
    if int(value) < 1:
        raise KdkitError(f"stages.generations={value} must be >= 1")
    return int(value)


def _unrouted(distillers: dict) -> dict:
    """The distillers reading whatever teacher there is (a born-again generation has one)."""
    for d in distillers.values():
        if d.reads_several_teachers:
            d.teacher_names = None
        else:
            d.reading(None)
    return distillers


def train_stage(cfg, datamodule, out: Path, stage: str, teachers: dict | None = None,
                teacher_cfgs: dict | None = None) -> tuple[dict, nn.Module]:
    """Train the student alone (``baseline``) or with distillers; its results and the student.

    ``student-gen<k>`` stages are born-again generations: their one teacher is the student of
    generation k-1, and their distillers read it whatever teacher they name. Generation k's
    student is exported to ``export/gen<k>/`` (the first generation to ``export/``).
    """
    L.seed_everything(cfg.seed, workers=True)  # baseline and student start from the same init
    student = instantiate(cfg.student.model)
    generation = stage.startswith("student-gen")
    export = out / "export" / stage.removeprefix("student-") if generation else out / "export"
    if _done(out, stage):
        if stage != "baseline" and (export / "student.pt").exists():
            from kdkit.checkpoints import load_weights

            load_weights(student, export / "student.pt", what=f"this run's exported {stage}")
        return _load_stage(out, stage), student
    distillers = {}
    if stage != "baseline":
        distillers = _unrouted(make_distillers(cfg)) if generation else make_distillers(cfg)
    task = make_task(cfg, student=student, teachers=teachers if distillers else None,
                     distillers=distillers, datamodule=datamodule, teacher_cfgs=teacher_cfgs)
    results = fit_and_test(cfg, task, datamodule, out, stage, train=True)
    if stage != "baseline":
        check_finite(task, f"the distilled {stage}")
        if rank_zero_only.rank == 0:
            task.export(export, with_adapters=cfg.export.adapters)
    return results, student


def warn_weaker_teachers(results: dict) -> None:
    """One warning line per teacher whose validation score is below the baseline's, and the
    fact (``weaker_than_baseline``) in its results: distilling such a teacher usually hurts."""
    base = _validation_score(results.get("baseline", {}))
    if base is None:
        return
    for key, stage_results in results.items():
        score = _validation_score(stage_results) if key.startswith("teacher") else None
        if score is None:
            continue
        stage_results["weaker_than_baseline"] = score[1] < base[1]
        if score[1] < base[1]:
            say(f"{key} scores {score[0]}={score[1]:.4f} on validation data, below the student "
                f"trained alone ({base[1]:.4f}); distilling it usually hurts the student", warning=True)


def _validation_score(stage_results: dict) -> tuple[str, float] | None:
    """(key, value) of the stage's primary validation metric: the kept weights' when the task
    selects weights (``val/<metric>_selected``), else the last validation."""
    metric = stage_results.get("primary_metric")
    for key in (f"val/{metric}_selected", f"val/{metric}") if metric else ():
        if isinstance(stage_results.get(key), (int, float)):
            return key, float(stage_results[key])
    return None


def make_task(cfg, student, teachers: dict | None = None, distillers=None,
              role_of_student: str = "student", datamodule=None, probe: bool = False,
              student_cfg=None, teacher_cfgs: dict | None = None):
    """Instantiate ``cfg.task`` (a partial) around the given models.

    ``student_cfg``: the config of the trained model (``cfg.student``, or a teacher's config in
    its own stage): its optimizer settings and input pipeline. ``teacher_cfgs``: name -> config
    of each teacher (input pipeline, precision, cache). ``probe``: a task only to be probed
    (``check_before_training``): no teacher cache is built and nothing is compiled.
    """
    student_cfg = cfg.student if student_cfg is None else student_cfg
    teachers = teachers or {}
    teacher_cfgs = teacher_cfgs or {}
    kwargs = dict(
        student=student,
        teachers=teachers,
        distillers=distillers or {},
        teacher_precision={name: teacher_cfgs[name].get("precision") for name in teachers},
        inputs={"student": input_options(student_cfg),
                **{name: input_options(teacher_cfgs[name]) for name in teachers}},
    )
    if probe:
        kwargs["compile"] = False
    caches = {name: teacher_cfgs[name] for name in teachers if teacher_cfgs[name].get("cache")}
    if caches and not probe:
        from kdkit.cache import build_teacher_cache

        kwargs["teacher_cache"] = {name: build_teacher_cache(cfg, teachers[name], datamodule, tcfg)
                                   for name, tcfg in caches.items()}
    task_cfg = cfg.task
    own = student_cfg.get("optimizer")
    if own:  # <role>.optimizer: this model's own optimizer settings (e.g. a student's weight decay)
        task_cfg = OmegaConf.merge(cfg.task, {"optimizer": own})
    task = instantiate(task_cfg)(**kwargs)
    task.student_role = role_of_student
    return task


# keys of a model's config that make its own input pipeline (read by image tasks)
INPUT_KEYS = ("normalize", "image_size")


def input_options(model_cfg) -> dict:
    """A model's own input pipeline from its config, without the unset keys."""
    return {key: _container(model_cfg.get(key)) for key in INPUT_KEYS if model_cfg.get(key) is not None}


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
                 evaluate: bool = True, max_epochs=None, validate: bool = False) -> dict | None:
    """Train (optionally) and test one stage with one Trainer, so its logs stay in one place.

    Returns the stage's results (test metrics as logged + ``task.inference_report``), also
    written to ``stages/<stage>.json``; None when ``evaluate`` is false. ``validate``: measure
    an untrained (evaluated-only) model on the validation data too, for comparisons that must
    not look at the test set (``warn_weaker_teachers``).
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
    if validate and not train and is_overridden("val_dataloader", datamodule, L.LightningDataModule):
        for metrics in trainer.validate(task, datamodule=datamodule, verbose=False):
            results.update({k: float(v) for k, v in metrics.items() if k.startswith("val/")})
    if task.primary_metric:
        results["primary_metric"] = task.primary_metric
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
    return datamodule.example_batch(n=cfg.get("report", {}).get("latency_batch_size") or None)


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
