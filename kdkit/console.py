"""What a run prints around Lightning's own lines: its directory, and Lightning's logs tamed.

Lightning logs through ``logging`` on its ``lightning.pytorch`` / ``lightning.fabric`` loggers
(``rank_zero_info``: the GPU/TPU/HPU availability lines, the litlogger tip, "Seed set to ..."),
and every stage builds a new Trainer, so each of those lines came once per stage. ``start_run``
lets each distinct message through once per run and sends the lines through whatever
``sys.stderr`` is at that moment (see ``_CurrentStderrHandler``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from kdkit.errors import say

# the loggers Lightning's repeated lines come from (lightning 2.6: rank_zero_info logs to the
# first; seed_everything to the seed ones)
ONCE_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                "lightning.fabric.utilities.seed", "lightning.pytorch.utilities.seed")
# the loggers Lightning gives a StreamHandler of its own at import
HANDLER_LOGGERS = ("lightning.pytorch", "lightning.fabric")


class OncePerRun(logging.Filter):
    """A logging filter that lets each distinct message through once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


class _CurrentStderrHandler(logging.StreamHandler):
    """A StreamHandler writing to the ``sys.stderr`` of the moment, not the one at import.

    While a rich progress bar is live, rich swaps ``sys.stderr`` for a proxy that prints above
    the bar. Lightning's handler kept the original stream, so a line logged during the bar
    (``Trainer.fit stopped: max_epochs reached``) was written under it, rich then moved the cursor
    up by the bar's height from the wrong line, and the bar's first line was left on screen twice.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # logging sets it in __init__ and setStream; always current
        pass


def start_run(out: Path) -> None:
    """Say where the run writes, and install the filters for this run (rank zero prints)."""
    say(f"run directory: {out}")
    tame_lightning_logs()


def tame_lightning_logs() -> None:
    """Install a fresh ``OncePerRun`` on Lightning's repeating loggers and make its handlers
    write to the current ``sys.stderr``; calling it again starts a new run's record."""
    for name in ONCE_LOGGERS:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, OncePerRun)]:
            logger.removeFilter(old)
        logger.addFilter(OncePerRun())
    for name in HANDLER_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # Lightning's own; others are the user's
                current = _CurrentStderrHandler()
                current.setLevel(handler.level)
                current.setFormatter(handler.formatter)
                for f in handler.filters:
                    current.addFilter(f)
                logger.removeHandler(handler)
                logger.addHandler(current)
