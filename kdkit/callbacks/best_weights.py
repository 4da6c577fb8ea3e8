"""KeepBestWeights: restore the trained weights of the best validation epoch when fitting ends."""

from __future__ import annotations

import math

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from kdkit.errors import KdkitError


class KeepBestWeights(L.Callback):
    """Keep the weights of the epoch with the best validation ``monitor`` and load them back
    when fitting ends, so testing, the results and the export see those weights (GLNN and
    FF-G2M report test accuracy at the best validation epoch).

    What is kept is the task's trained state: ``student`` and the distillers' adapters
    (``distillers``), as their ``state_dict`` (parameters and persistent buffers) cloned on their
    device; a module without those attributes is kept whole. Teachers, optimizer and metrics are
    not touched. After every validation run of a fit (not the sanity check, not
    ``trainer.validate``) the logged ``monitor`` is compared with the best so far; on ties the
    later epoch wins (``>=`` for "max", ``<=`` for "min"), as GLNN's and FF-G2M's code do.

    The kept weights travel in checkpoints (``state_dict`` of this callback, under its
    ``state_key``), so a resumed fit still restores the best epoch seen before the interruption.

    ``fit_summary(module)`` gives ``{"<monitor>_selected": best score}`` (e.g.
    ``val/acc_selected``), which ``DistillationTask.fit_summary`` adds to the stage's results.

    Args:
        monitor: the logged metric that ranks epochs, e.g. ``"val/acc"``.
        mode: "max" or "min".
        teacher_stage: also select while the runner trains a teacher itself (the task's
            ``student_role == "teacher"``). Off by default: e.g. a GCN stopped at its best
            validation epoch is accurate but under-trained, and its soft labels teach worse
            (Cora, GLNN, 5 seeds: 80.0% from it vs 81.0% from the same GCN after 300 epochs).
    """

    def __init__(self, monitor: str = "val/acc", mode: str = "max", teacher_stage: bool = False):
        if mode not in ("max", "min"):
            raise KdkitError(f"KeepBestWeights: mode={mode!r}, use 'max' or 'min'")
        self.monitor = monitor
        self.mode = mode
        self.teacher_stage = bool(teacher_stage)
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict[str, dict[str, Tensor]] | None = None
        self._warned = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    def selects(self, module: L.LightningModule) -> bool:
        """Whether this fit selects: always for students, for a teacher only if ``teacher_stage``."""
        return self.teacher_stage or getattr(module, "student_role", "student") != "teacher"

    # ---- hooks --------------------------------------------------------------------------------
    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # on_validation_end runs after the module's on_validation_epoch_end has logged the metrics
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or not self.selects(module):
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            if not self._warned:
                rank_zero_warn(f"KeepBestWeights: '{self.monitor}' was not logged; logged: "
                               f"{sorted(trainer.callback_metrics)}")
                self._warned = True
            return
        score = float(value)
        if math.isnan(score):
            return
        if self.best_score is None or self._at_least_as_good(score, self.best_score):
            self.best_score, self.best_epoch = score, int(trainer.current_epoch)
            self.best_state = {name: {k: v.detach().clone() for k, v in part.state_dict().items()}
                               for name, part in trained_parts(module).items()}

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.best_state is not None and self.selects(module):
            for name, part in trained_parts(module).items():
                part.load_state_dict(self.best_state[name])

    def fit_summary(self, module: L.LightningModule) -> dict:
        """``{"<monitor>_selected": score}`` of the kept weights; empty when nothing was selected."""
        if self.best_score is None or not self.selects(module):
            return {}
        return {f"{self.monitor}_selected": self.best_score}

    def _at_least_as_good(self, score: float, best: float) -> bool:
        return score >= best if self.mode == "max" else score <= best

    # ---- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.best_state is None:
            return {}
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "state": self.best_state}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best_score = float(state_dict["best_score"])
        self.best_epoch = int(state_dict["best_epoch"])
        self.best_state = state_dict["state"]


def trained_parts(module: nn.Module) -> dict[str, nn.Module]:
    """The parts of ``module`` that training changes: ``student`` and ``distillers`` (their
    adapters) of a ``DistillationTask``; any other module whole."""
    parts = {name: getattr(module, name) for name in ("student", "distillers")
             if isinstance(getattr(module, name, None), nn.Module)}
    return parts or {"module": module}
