"""One stage's Trainer and its fit/test: loggers, checkpoints, resume points, stage results.

``kdkit.pipeline`` decides which stages run with which models; this module runs one of them
under Lightning and keeps its files in place: checkpoints under ``checkpoints/<stage>``, logs
under ``logs/<stage>``, results in ``stages/<stage>.json`` (a finished stage is skipped when
resuming).
"""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path

import lightning as L
from hydra.utils import get_method, instantiate
from lightning.pytorch.callbacks import Checkpoint, ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import OmegaConf

from kdkit.callbacks.agreed_sigterm import AgreedSigterm
from kdkit.callbacks.progress import StageProgressBar
from kdkit.checkpoint_io import AtomicCheckpointIO, safe_load, write_atomically
from kdkit.checkpointing import ResumePoint, find_resume_point
from kdkit.distributed import refuse_relaunch_in_sweep, warn_if_oversubscribed
from kdkit.divergence import DivergenceError
from kdkit.errors import KdkitError, say, unreadable
from kdkit.run_environment import last_start


def make_trainer(cfg, out: Path, stage: str, max_epochs=None, resume_at=None) -> L.Trainer:
    """The stage's Trainer: its callbacks and loggers, checkpoints under ``checkpoints/<stage>``,
    progress bars named after the stage (``kdkit.callbacks.progress``).

    ``resume_at``: ``(epoch, global_step)`` of the checkpoint the stage resumes from, for the
    loggers that continue their files (``kdkit.csv_logger``).
    """
    callbacks = [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node]
    callbacks.append(AgreedSigterm())  # DDP ranks stop together on SIGTERM (Lightning's handler can hang them)
    if not cfg.trainer.get("enable_progress_bar", True):  # one switch turns every bar off
        callbacks = [cb for cb in callbacks if not isinstance(cb, ProgressBar)]
    for cb in callbacks:
        if isinstance(cb, Checkpoint) and hasattr(cb, "dirpath"):
            cb.dirpath = str(out / "checkpoints" / stage)
        if isinstance(cb, StageProgressBar):
            cb.stage = stage
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
    # W&B and CSV get the whole resolved config once per stage, and what the numbers depend on
    # beyond it (kdkit.run_environment), so runs compared on a dashboard show their kernels too
    hparams = {**OmegaConf.to_container(cfg, resolve=True), "environment": last_start(out)} if loggers else {}
    for logger in loggers:
        logger.log_hyperparams(hparams)
    return trainer


def _resume_kwargs(node, resume_at) -> dict:
    """``{"resume_at": ...}`` for logger factories that take it (they continue their files)."""
    if resume_at is None:
        return {}
    factory = get_method(node["_target_"])
    return {"resume_at": resume_at} if "resume_at" in inspect.signature(factory).parameters else {}


def fit_and_test(cfg, task, datamodule, out: Path, stage: str, train: bool,
                 evaluate: bool = True, max_epochs=None, validate: bool = False,
                 facts: dict | None = None) -> dict | None:
    """Train (optionally) and test one stage with one Trainer, so its logs stay in one place.

    Returns the stage's results (test metrics as logged + ``task.inference_report``), also
    written to ``stages/<stage>.json``; None when ``evaluate`` is false. ``validate``: measure
    an untrained (evaluated-only) model on the validation data too, for comparisons that must
    not look at the test set (``warn_weaker_teachers``). ``facts``: more entries for the
    stage's results (e.g. how many training samples had no label).
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
        results["fit_steps"] = int(trainer.global_step)  # optimizer steps in all, a resumed fit's included
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
               **results, **(facts or {})}
    write_on_rank_zero(out / "stages" / f"{stage}.json", json.dumps(results, indent=2))
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


def _latency_batch(cfg, datamodule) -> dict:
    return datamodule.example_batch(n=cfg.get("report", {}).get("latency_batch_size") or None)


def stage_done(out: Path, stage: str) -> bool:
    return (out / "stages" / f"{stage}.json").exists()


def load_stage(out: Path, stage: str) -> dict:
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
def write_on_rank_zero(path: Path, text: str) -> None:
    write_atomically(path, text)
