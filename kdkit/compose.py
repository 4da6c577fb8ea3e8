"""Build a run's config from Python (notebooks, tests), through the same files as kdkit-train."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from omegaconf import DictConfig, open_dict


def compose(overrides: Sequence[str] = (), output_dir: str | None = None) -> DictConfig:
    """The config ``kdkit-train <overrides>`` would run, with ``paths.output_dir`` set.

    Args:
        overrides: Hydra command-line overrides, e.g. ``["experiment=cora_glnn", "seed=1"]``.
        output_dir: where the run writes; a fresh temporary directory when None.
    """
    with initialize_config_module(config_module="kdkit.conf", version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = output_dir or tempfile.mkdtemp(prefix="kdkit-")
    return cfg


def run(overrides: Sequence[str] = (), output_dir: str | None = None) -> dict:
    """Compose and run: ``{stage: metrics}`` exactly as written to ``results.json``."""
    from kdkit.pipeline import run as run_pipeline

    return run_pipeline(compose(overrides, output_dir))
