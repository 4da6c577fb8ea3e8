"""``kdkit-train``: the Hydra entry point. Imports nothing heavy until a run starts."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, open_dict


@hydra.main(version_base="1.3", config_path="pkg://kdkit.conf", config_name="train")
def _hydra_main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig

    with open_dict(cfg):
        if not cfg.paths.get("output_dir"):
            cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    return run_or_explain(cfg)


def run_or_explain(cfg: DictConfig):
    """Run the pipeline; a user mistake (KdkitError) becomes one line on stderr and exit 2."""
    from kdkit.errors import find_kdkit_error

    try:
        from kdkit.pipeline import run

        return run(cfg)
    except Exception as exc:  # noqa: BLE001 - we re-raise anything that is not ours
        err = find_kdkit_error(exc)
        if err is None:
            raise
        print(f"kdkit: error: {err}", file=sys.stderr)
        _summarize_stopped_sweep()
        sys.exit(2)


def _summarize_stopped_sweep() -> None:
    """In a ``-m`` sweep, the summary of the jobs so far: the exit below ends the sweep before
    Hydra's end-of-sweep callback (``kdkit.sweep_summary``) could write it."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        from kdkit.sweep_summary import SweepSummary

        SweepSummary()._write(Path(HydraConfig.get().sweep.dir))


def main() -> None:
    """``kdkit-train``: a bad group choice or key is one line and exit 2; else Hydra runs."""
    from kdkit.cli_checks import check_argv

    # Hydra's own errors for these name neither the valid choices nor the key meant
    message = check_argv(sys.argv[1:])
    if message:
        print(f"kdkit: error: {message}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
