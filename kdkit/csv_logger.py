"""``metrics.csv`` per stage that a resumed stage continues instead of overwriting.

Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts, so a resumed stage
lost the log of every epoch before the interruption. Here a resumed stage keeps the rows written
up to its checkpoint (rows logged after it, which the resumed run logs again, are dropped) and
appends.
"""

from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from kdkit.errors import say


def _keep(row: dict, step: int) -> bool:
    """Whether a row was logged before the checkpoint after ``step`` optimizer steps was written.

    Lightning logs a training row after batch ``k`` at step ``k - 1`` and an epoch's validation
    at its last batch's step; a checkpoint after ``step`` batches covers the rows at steps below
    ``step``. A row at ``step`` itself belongs to the batch after the checkpoint (or to the
    validation that follows it, when the checkpoint is mid-epoch), or is the next epoch's
    learning-rate row: all of them run again after the resume.
    """
    try:
        row_step = int(float(row.get("step") or -1))
    except ValueError:
        return False
    return row_step < step


class _ResumingWriter(ExperimentWriter):
    def __init__(self, log_dir: str, resume_at: tuple[int, int] | None):
        self._resume_at = resume_at
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if self._resume_at is None or not os.path.isfile(self.metrics_file_path):
            super()._check_log_dir_exists()  # a fresh stage: start the file anew
            return
        try:
            with open(self.metrics_file_path, newline="") as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or [])
                rows = [row for row in reader if _keep(row, self._resume_at[1])]  # (epoch, step)
            if "step" not in header:
                raise ValueError("no 'step' column")
        except (OSError, UnicodeDecodeError, csv.Error, ValueError) as err:
            aside = self.metrics_file_path + ".corrupt"
            os.replace(self.metrics_file_path, aside)
            say(f"{self.metrics_file_path} is unreadable ({err}); moved it to {aside} and "
                "starting the log anew", warning=True)
            return
        with open(self.metrics_file_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = sorted(header)  # new rows line up with the existing columns


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger that appends to a resumed stage's ``metrics.csv``.

    Args:
        resume_at: ``(epoch, global_step)`` of the checkpoint the stage resumes from; None for a
            stage that starts from scratch (the file is started anew).
        Others: as ``CSVLogger``.
    """

    def __init__(self, *args, resume_at: tuple[int, int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._resume_at = resume_at

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingWriter(self.log_dir, self._resume_at)
        return self._experiment
