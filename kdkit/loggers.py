"""Logger factories: one logger per stage, all of a run's stages grouped together."""

from __future__ import annotations

import os
from pathlib import Path


def csv_logger(save_dir: str, stage: str, name: str = "logs"):
    """CSV metrics at ``<save_dir>/<name>/<stage>/metrics.csv``."""
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(save_dir=save_dir, name=name, version=stage)


def wandb_logger(stage: str, project: str = "kdkit", group: str | None = None,
                 save_dir: str = ".", mode: str | None = None, **kwargs):
    """A W&B run per stage (``<group>/<stage>``), grouped by experiment.

    Offline unless an API key is configured (``WANDB_API_KEY`` or ``wandb login``), so runs on
    air-gapped clusters still log and can be synced later with ``wandb sync``.
    """
    from lightning.pytorch.loggers import WandbLogger

    if mode is None:
        mode = os.environ.get("WANDB_MODE") or ("online" if _has_wandb_key() else "offline")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(project=project, group=group, name=f"{group}/{stage}" if group else stage,
                       save_dir=save_dir, mode=mode, job_type=stage, **kwargs)


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")
