"""Checkpoints during every stage, and finding the one to resume from.

Lightning's ``ModelCheckpoint(save_top_k=0, save_last=True)`` writes ``last.ckpt`` only when a
fit *ends*, so a killed stage had nothing to resume from. ``StageCheckpoint`` writes
``last.ckpt`` every epoch (and optionally every N steps or minutes), keeps the one before as
``previous.ckpt``, writes one more when the run is interrupted (Ctrl-C, or SIGTERM from a
cluster's pre-emption), and stores the global random state so a resumed stage draws the same
dropout masks and augmentations as an uninterrupted one (and, through the training loader's
state, continues an interrupted epoch at its next batch: ``kdkit.resumable_loader``).
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from kdkit.checkpoint_io import remove_stale_temporaries, safe_load
from kdkit.errors import KdkitError, say

LAST = "last.ckpt"
PREVIOUS = "previous.ckpt"


class StageCheckpoint(Checkpoint):
    """Write ``<dirpath>/last.ckpt`` during training so ``ckpt_path=last`` can resume a stage.

    Args:
        dirpath: the stage's checkpoint directory (the pipeline sets ``checkpoints/<stage>``).
        every_n_epochs: write at the end of every N-th epoch (0: never at epoch ends).
        every_n_train_steps: also write every N optimizer steps (null: off); one that falls on
            an epoch's last batch is written at the epoch's end, after its validation.
        train_time_interval: also write when this many minutes passed since the last write.
        keep_previous: keep the checkpoint before ``last.ckpt`` as ``previous.ckpt``, the
            fallback when ``last.ckpt`` is found corrupt.
        save_on_interrupt: write one on Ctrl-C and on SIGTERM (SLURM pre-emption).
    """

    def __init__(self, dirpath: str | None = None, every_n_epochs: int = 1,
                 every_n_train_steps: int | None = None, train_time_interval: float | None = None,
                 keep_previous: bool = True, save_on_interrupt: bool = True):
        if every_n_epochs < 0 or (every_n_train_steps is not None and every_n_train_steps < 1):
            raise KdkitError("callbacks.checkpoint: every_n_epochs must be >= 0 and "
                             "every_n_train_steps >= 1 (or null)")
        if train_time_interval is not None and not train_time_interval > 0:
            raise KdkitError("callbacks.checkpoint.train_time_interval: minutes > 0, or null")
        self.dirpath = dirpath
        self.every_n_epochs = int(every_n_epochs)
        self.every_n_train_steps = every_n_train_steps
        self.interval_s = None if train_time_interval is None else 60.0 * float(train_time_interval)
        self.keep_previous = keep_previous
        self.save_on_interrupt = save_on_interrupt
        self._last_saved_step: int | None = None
        self._last_saved_time = time.monotonic()
        self._loader_states: list[dict] | None = None  # loader positions of the checkpoint resumed from
        self._due_at_epoch_end = False  # a step checkpoint fell on the epoch's last batch
        self._trainer = None  # set in setup(): state_dict() is called without it

    @property
    def last_path(self) -> Path:
        if self.dirpath is None:
            raise KdkitError("StageCheckpoint.dirpath is not set")
        return Path(self.dirpath) / LAST

    # ---- when to write ---------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_saved_step = trainer.global_step  # a resumed stage has its checkpoint already
        self._last_saved_time = time.monotonic()
        # Lightning hands loaders their state only when it builds them after the restore; a
        # scheduler that asks for the epoch's length builds them before. The first batch is
        # drawn after this hook, so the loaders learn their place here either way.
        states, self._loader_states = self._loader_states, None
        for loader, state in zip(resumable_loaders(trainer), states or []):
            loader.load_state_dict(state)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        due = bool(self.every_n_train_steps) and step % self.every_n_train_steps == 0
        if self.interval_s is not None:
            elapsed = time.monotonic() - self._last_saved_time >= self.interval_s
            due = due or trainer.strategy.broadcast(elapsed)  # rank 0's clock decides for all
        if due and batch_idx + 1 >= trainer.num_training_batches:
            # The epoch's last batch: Lightning resumes a checkpoint written here past the
            # epoch's validation, which would then never run. Written after it, at the epoch end.
            self._due_at_epoch_end = True
        elif due:
            self.save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        due, self._due_at_epoch_end = self._due_at_epoch_end, False
        if due or (self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0):
            self.save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        interrupted = isinstance(exception, (KeyboardInterrupt, SIGTERMException))
        if not (interrupted and self.save_on_interrupt and trainer.state.fn == TrainerFn.FITTING):
            return  # a crash or a divergence: the last good checkpoint stays as it is
        # Under DDP, Ctrl-C reaches the ranks at different steps: no barrier, rank 0 writes alone.
        self.save(trainer, barrier=isinstance(exception, SIGTERMException))
        say(f"interrupted at epoch {trainer.current_epoch}, step {trainer.global_step}; checkpoint "
            f"written to {self.last_path} (resume: the same command with ckpt_path=last)")

    # ---- writing ---------------------------------------------------------------------------
    def save(self, trainer, barrier: bool = True) -> None:
        """Write ``last.ckpt`` now (moving the one before to ``previous.ckpt``)."""
        if self._last_saved_step == trainer.global_step and self.last_path.exists():
            return
        for loader in resumable_loaders(trainer):  # where the epoch resumes: after the batches the loop finished
            loader.trained(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        if trainer.is_global_zero:
            if self.keep_previous:
                _keep_as_previous(self.last_path)
            trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, self.last_path)
        if barrier:
            trainer.strategy.barrier("kdkit.StageCheckpoint.save")
        self._last_saved_step = trainer.global_step
        self._last_saved_time = time.monotonic()

    # ---- random state travels with the checkpoint ---------------------------------------------
    def state_dict(self) -> dict:
        trainer = self._trainer
        loaders = [dl.state_dict() for dl in resumable_loaders(trainer)] if trainer is not None else []
        return {"rng": rng_state(), "loaders": loaders}

    def load_state_dict(self, state_dict: dict) -> None:
        if "rng" in state_dict:
            set_rng_state(state_dict["rng"])
        self._loader_states = state_dict.get("loaders")


def resumable_loaders(trainer) -> list:
    """The training loaders of ``trainer``'s fit that know their place in an epoch."""
    from kdkit.resumable_loader import ResumableLoader

    combined = trainer.fit_loop._combined_loader
    return [dl for dl in (combined.flattened if combined is not None else []) if isinstance(dl, ResumableLoader)]


def _keep_as_previous(last: Path) -> None:
    """Hard-link ``last`` to ``previous`` (atomically), so a valid ``last`` exists at all times."""
    if not last.exists():
        return
    previous = last.with_name(PREVIOUS)
    tmp = last.with_name(f".{PREVIOUS}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(last, tmp)
    except OSError:  # a filesystem without hard links
        import shutil

        shutil.copy2(last, tmp)
    os.replace(tmp, previous)


def rng_state() -> dict:
    """The global torch / CUDA / numpy / Python random state, in types ``weights_only`` loads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": list(random.getstate()),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ---- choosing what to resume from ------------------------------------------------------------
@dataclass
class ResumePoint:
    """A checkpoint that loaded: its path and where in the stage it was written."""

    path: Path
    epoch: int
    global_step: int
    fell_back: bool = False


def find_resume_point(directory: str | os.PathLike) -> ResumePoint | None:
    """The newest loadable checkpoint in a stage's directory, or None when there is none.

    ``last.ckpt`` first; when it does not load (truncated, corrupt), it is moved aside to
    ``last.ckpt.corrupt`` (so the next write cannot rotate it over the good one) and
    ``previous.ckpt`` is used with a warning. When neither loads: one-line KdkitError.
    """
    directory = Path(directory)
    last, previous = directory / LAST, directory / PREVIOUS
    if rank_zero_only.rank == 0:  # the run that resumes is this directory's only writer
        for path in (last, previous):
            remove_stale_temporaries(path, older_than=0)
    errors = []
    for path in (last, previous):
        if not path.exists():
            continue
        try:
            ckpt = safe_load(path, "resume checkpoint", mmap=True)  # CRCs checked; Lightning loads it next
        except KdkitError as err:
            errors.append(str(err))
            continue
        if not isinstance(ckpt, dict) or "global_step" not in ckpt:
            errors.append(f"{path} is not a Lightning checkpoint")
            continue
        point = ResumePoint(path, int(ckpt.get("epoch", 0)), int(ckpt["global_step"]), bool(errors))
        if errors:
            aside = last.with_name(LAST + ".corrupt")
            if rank_zero_only.rank == 0:
                with contextlib.suppress(FileNotFoundError):  # already moved by an earlier try
                    os.replace(last, aside)
            say(f"{errors[0]}; moved it to {aside.name} and resuming from {path.name}", warning=True)
        return point
    if errors:
        raise KdkitError(f"no loadable checkpoint in {directory}: {'; '.join(errors)}. Delete the "
                         "directory to start the stage again")
    return None
