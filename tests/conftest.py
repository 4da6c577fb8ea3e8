"""Shared test setup: offline, single-threaded, tiny; a compose fixture for whole runs."""

from __future__ import annotations

import os
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
]


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
