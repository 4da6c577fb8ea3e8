"""Build and run a run's config from Python (notebooks, tests), through the same files as kdkit-train."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from omegaconf import DictConfig, open_dict


class RunResults(dict):
    """``{stage: metrics}`` exactly as written to ``results.json``, plus ``run_dir``: the
    directory the run wrote (checkpoints, logs, ``export/``, ``results.json``, ``results.md``)."""

    def __init__(self, results: dict, run_dir: str | Path) -> None:
        super().__init__(results)
        self.run_dir = Path(run_dir)


def compose(overrides: Sequence[str] = (), output_dir: str | None = None) -> DictConfig:
    """The config ``kdkit-train <overrides>`` would run, with ``paths.output_dir`` set.

    Args:
        overrides: Hydra command-line overrides, e.g. ``["experiment=cora_glnn", "seed=1"]``;
            ``hydra.run.dir=...`` and ``paths.output_dir=...`` choose the run directory as they
            do on the command line.
        output_dir: where the run writes. When None, the directory kdkit-train would use:
            ``hydra.run.dir`` (``<paths.log_dir>/<name>/<date>_<time>``) under the current
            directory, with ``_1``, ``_2``, ... appended if that one already exists (a run in an
            existing directory would skip the stages it finds finished there). Nothing is created.
    """
    with initialize_config_module(config_module="kdkit.conf", version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    run_dir = output_dir or cfg.paths.get("output_dir") or _fresh(Path(str(cfg.hydra.run.dir)).absolute())
    with open_dict(cfg):
        del cfg["hydra"]  # as kdkit-train's task config: the run never reads Hydra's own settings
        cfg.paths.output_dir = str(run_dir)
    return cfg


def run(overrides: Sequence[str] = (), output_dir: str | None = None) -> RunResults:
    """Compose (see ``compose``) and run; the results, as a dict, with ``.run_dir``."""
    from kdkit.pipeline import run as run_pipeline

    cfg = compose(overrides, output_dir)
    return RunResults(run_pipeline(cfg), cfg.paths.output_dir)


def _fresh(path: Path) -> Path:
    """``path``, or ``path_<k>`` with the smallest k that does not exist yet."""
    candidate, k = path, 0
    while candidate.exists():
        k += 1
        candidate = path.with_name(f"{path.name}_{k}")
    return candidate


__all__ = ["RunResults", "compose", "run"]
