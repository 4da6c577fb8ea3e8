"""SIGTERM (a cluster's pre-emption) stops every DDP rank after the same training step.

Lightning 2.6's SIGTERM handler runs ``dist.broadcast`` inside the signal handler. A signal
lands wherever a rank happens to be: one rank broadcasts from the handler while another waits in
DDP's gradient all-reduce, and the job hangs until the cluster's SIGKILL, often before the
interrupt checkpoint is written (kdkit's fault suite, ``benchmarks/results/faults.md``, saw it in
most runs). Its check after each step also acts on the rank's own flag, so ranks that got the
signal at different steps stop at different steps.
"""

from __future__ import annotations

import signal
import threading

import lightning as L
import torch
import torch.distributed as dist


class AgreedSigterm(L.Callback):
    """While a fit runs, SIGTERM only notes that it came (and forwards it to the ranks this
    process launched, as Lightning's handler does); after every training step the ranks agree
    with one all-reduce whether any of them got it, and all of them stop after that step, where
    kdkit's checkpoint callback writes the interrupt checkpoint. Lightning's own handler is back
    once training ends. On one process the signal stops the fit as Lightning's handler would.

    ``make_trainer`` adds it to every stage's trainer: it is a fix, not an option.
    """

    def __init__(self):
        self._noted = False
        self._previous = None
        self._trainer = None

    def on_train_start(self, trainer, pl_module) -> None:
        # not on_fit_start: Lightning sets its handlers after that hook, over this one
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        self._noted, self._trainer = False, trainer
        self._previous = signal.signal(signal.SIGTERM, self._note)

    def _note(self, signum, frame) -> None:
        trainer = self._trainer
        if not self._noted and trainer is not None and trainer.strategy.launcher is not None:
            trainer.strategy.launcher.kill(signum)  # the other ranks, when this process started them
        self._noted = True
        if trainer is not None and trainer.world_size == 1:
            trainer._signal_connector.received_sigterm = True  # no other rank to agree with

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            flag = torch.tensor([1 if self._noted else 0], device=trainer.strategy.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank calls it after the same step
            if flag.item():
                trainer._signal_connector.received_sigterm = True  # Lightning stops all ranks here

    def _restore(self) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous)
        self._previous, self._trainer = None, None

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()
