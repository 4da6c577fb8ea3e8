"""Callbacks that deliver a real signal to the running process at a chosen point of a stage.

Used by the fault tests to interrupt a run the way a user (Ctrl-C) or a cluster (SIGTERM)
does: the signal goes through the operating system, and Lightning's and kdkit's handlers see
exactly what they would see in a terminal or under SLURM.
"""

from __future__ import annotations

import os
import signal

from lightning.pytorch.callbacks import Callback


class SignalAtEpochEnd(Callback):
    """Send ``signal`` to this process at the end of ``epoch`` (0-based) of ``stage``.

    Args:
        stage: the pipeline stage ("teacher", "baseline", "student"): the callback is matched by
            the checkpoint directory name the pipeline gives each stage.
        epoch: the epoch after which to signal.
        signal_name: "SIGINT" (Ctrl-C) or "SIGTERM" (pre-emption).
        after_batches: instead of at the epoch end, signal after this many batches of ``epoch``.
    """

    def __init__(self, stage: str, epoch: int, signal_name: str = "SIGINT",
                 after_batches: int | None = None):
        self.stage, self.epoch = stage, int(epoch)
        self.signum = getattr(signal, signal_name)
        self.after_batches = after_batches

    def _here(self, trainer) -> bool:
        dirs = [getattr(cb, "dirpath", "") or "" for cb in trainer.callbacks]
        return any(str(d).rstrip("/").endswith(f"/{self.stage}") for d in dirs)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (self.after_batches is not None and trainer.current_epoch == self.epoch
                and batch_idx + 1 == self.after_batches and self._here(trainer)):
            os.kill(os.getpid(), self.signum)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.after_batches is None and trainer.current_epoch == self.epoch and self._here(trainer):
            os.kill(os.getpid(), self.signum)
