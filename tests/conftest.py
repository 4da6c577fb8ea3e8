"""Shared test setup: offline, single-threaded, tiny; a compose fixture for whole runs."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("KDKIT_DATA_DIR", str(ROOT.parent / "shared" / "data"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402

torch.set_num_threads(1)

# Overrides that make any experiment a smoke run: a couple of batches per stage, no
# progress bars or checkpoints cluttering the output.
SMOKE = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false",
    "callbacks=none",
    "report.latency_batch_size=8",
    "export.programs=[]",  # ~5 s per run; tests/test_exports.py writes and loads them
]


class _StderrAtEmit(logging.StreamHandler):
    """A StreamHandler writing to ``sys.stderr`` as it is when a record is emitted.

    Lightning's console handler keeps the ``sys.stderr`` of the moment ``lightning`` is
    imported; imported inside a test, that is the test's capture stream (capsys), closed when
    the test ends, and every later log line fails with "I/O operation on closed file".
    """

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):  # StreamHandler.__init__ and setStream assign it: follow sys.stderr instead
        pass


@pytest.fixture(autouse=True)
def _lightning_logs_follow_stderr():
    """Once a test has imported lightning, point its console handlers at the live stderr."""
    yield
    if "lightning" not in sys.modules:  # lightning stays unimported until a test needs it
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler:
                handler.__class__ = _StderrAtEmit  # keeps its level and formatter


@pytest.fixture
def compose_run(tmp_path):
    """compose_run(*overrides) -> (cfg, results) for a whole kdkit run in tmp_path."""
    from kdkit.compose import compose
    from kdkit.pipeline import run

    def _run(*overrides: str, smoke: bool = True):
        cfg = compose([*(SMOKE if smoke else []), *overrides], output_dir=str(tmp_path / "run"))
        return cfg, run(cfg)

    return _run


@pytest.fixture
def data_dir() -> Path:
    path = Path(os.environ["KDKIT_DATA_DIR"])
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (set KDKIT_DATA_DIR)")
    return path
