"""One summary of a multirun (``kdkit-train -m ...``), written into its sweep directory.

``summary.csv``: one row per job (its overrides, ``ok`` or ``failed``, and every numeric figure of
every stage as ``<stage>/<metric>``, e.g. ``student/test/acc``). ``summary.md``: mean ± std over
seeds of each configuration (a configuration is a job's overrides without ``seed``).
``summary.png``: the headline test metric per configuration, stages side by side, with std
error bars. ``SweepSummary`` writes them at the end of a multirun (registered in
``conf/hydra/default.yaml``); ``summarize_sweep`` does it for any sweep directory.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from kdkit.checkpoint_io import write_atomically
from kdkit.errors import KdkitError, say, unreadable
from kdkit.report import md_row

SEED_KEYS = ("seed",)  # the overrides a configuration's repeats differ by


@dataclass
class Job:
    """One job of the sweep: its directory, overrides (key -> value) and results (None: failed)."""

    name: str
    overrides: dict[str, str]
    results: dict | None
    figures: dict[str, float] = field(default_factory=dict)

    @property
    def configuration(self) -> str:
        """The job's overrides without the seed, as on the command line (``-`` when none)."""
        return " ".join(f"{k}={v}" for k, v in self.overrides.items() if k not in SEED_KEYS) or "-"


def summarize_sweep(sweep_dir: str | Path) -> dict[str, Path]:
    """Write ``summary.csv``, ``summary.md`` and ``summary.png`` into ``sweep_dir``; their paths.

    Jobs are the subdirectories holding a job's ``.hydra/overrides.yaml`` or ``results.json`` (a
    job whose ``results.json`` is missing is listed as ``failed``). Without ``overrides.yaml``
    (``hydra.output_subdir=null``), a job's overrides are the keys of its ``config.yaml`` whose
    values differ between jobs.
    """
    sweep_dir = Path(sweep_dir)
    jobs = read_jobs(sweep_dir)
    if not jobs:
        raise KdkitError(f"{sweep_dir} holds no multirun jobs (subdirectories with .hydra/overrides.yaml "
                         "or results.json)")
    return {"csv": write_csv(jobs, sweep_dir / "summary.csv"),
            "md": write_markdown(jobs, sweep_dir / "summary.md", sweep_dir.name),
            "png": write_plot(jobs, sweep_dir / "summary.png")}


class SweepSummary(Callback):
    """Hydra callback: ``summarize_sweep`` at the end of a multirun, and after each later job
    once a job has failed (Hydra then stops before the end, and the summary shows how far it got)."""

    def __init__(self) -> None:
        self._failed = False

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:
            return
        self._failed = self._failed or job_return.status == JobStatus.FAILED
        if self._failed:
            self._write(Path(config.hydra.runtime.output_dir).parent)

    def on_multirun_end(self, config, **kwargs) -> None:
        self._write(Path(config.hydra.sweep.dir))

    def _write(self, sweep_dir: Path) -> None:
        try:
            paths = summarize_sweep(sweep_dir)
        except KdkitError as err:  # a summary must not turn a finished sweep into a failed one
            say(f"no sweep summary: {err}", warning=True)
            return
        say(f"sweep summary: {', '.join(str(p) for p in paths.values())}")


# ---- reading --------------------------------------------------------------------------------
def read_jobs(sweep_dir: Path) -> list[Job]:
    """Every job under ``sweep_dir``, in job-number order."""
    dirs = [d for d in sweep_dir.iterdir() if d.is_dir() and ((d / ".hydra").is_dir() or (d / "results.json").exists())]
    dirs.sort(key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))
    jobs = [Job(d.name, _overrides(d), _results(d)) for d in dirs]
    if any(not (d / ".hydra" / "overrides.yaml").exists() for d in dirs):
        _overrides_from_configs(jobs, dirs)
    for job in jobs:
        job.figures = _figures(job.results or {})
    return jobs


def _overrides(job_dir: Path) -> dict[str, str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    items = OmegaConf.to_container(OmegaConf.load(path))
    overrides = {}
    for item in items or []:
        key, _, value = str(item).partition("=")
        overrides[key.lstrip("+")] = value  # +key / ++key add a key: the same dimension of the sweep
    return overrides


def _overrides_from_configs(jobs: list[Job], dirs: list[Path]) -> None:
    """Each job's overrides as the config values that differ between jobs (no overrides.yaml)."""
    flat = []
    for d in dirs:
        path = d / "config.yaml"
        config = OmegaConf.to_container(OmegaConf.load(path)) if path.exists() else {}
        flat.append(_flatten(config))
    keys = [k for k in dict.fromkeys(k for f in flat for k in f)
            if k != "paths.output_dir" and len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1
            # resolved copies of the seed (data.seed: ${seed}) and of the job's own directory
            # (logger save_dir) vary with the job but are no configuration
            and (k in SEED_KEYS or any(f.get(k) != f.get("seed") for f in flat))
            and not all(str(f.get(k)).startswith(str(f.get("paths.output_dir"))) for f in flat)]
    for job, values in zip(jobs, flat):
        job.overrides = {k: json.dumps(values.get(k)) if isinstance(values.get(k), (list, dict)) else str(values.get(k))
                         for k in keys}


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _results(job_dir: Path) -> dict | None:
    path = job_dir / "results.json"
    if not path.exists():
        return None
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise unreadable(path, "the results of a sweep job", err) from None
    return results if isinstance(results, dict) else None


def _figures(results: dict) -> dict[str, float]:
    """``<stage>/<metric>`` -> value for every numeric figure (flags such as yes/no left out)."""
    return {f"{stage}/{key}": value for stage, metrics in results.items() if isinstance(metrics, dict)
            for key, value in metrics.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}


def headline_keys(jobs: list[Job]) -> dict[str, str]:
    """stage -> ``<stage>/test/<primary metric>`` (else its first test figure), for every stage."""
    keys: dict[str, str] = {}
    for job in jobs:
        for stage, metrics in (job.results or {}).items():
            if stage in keys or not isinstance(metrics, dict):
                continue
            metric = metrics.get("primary_metric")
            tests = [k for k in metrics if k.startswith("test/")]
            key = f"test/{metric}" if metric and f"test/{metric}" in metrics else (tests[0] if tests else None)
            if key:
                keys[stage] = f"{stage}/{key}"
    return keys


def configurations(jobs: list[Job]) -> dict[str, list[Job]]:
    """configuration -> its jobs, in order of first appearance."""
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.configuration, []).append(job)
    return groups


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None when there are too few values)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


# ---- writing --------------------------------------------------------------------------------
def write_csv(jobs: list[Job], path: Path) -> Path:
    """One row per job: job, status, its overrides, every figure of every stage."""
    override_keys = list(dict.fromkeys(k for job in jobs for k in job.overrides))
    figure_keys = list(dict.fromkeys(k for job in jobs for k in job.figures))
    f = io.StringIO(newline="")
    writer = csv.writer(f)
    writer.writerow(["job", "status", *override_keys, *figure_keys])
    for job in jobs:
        writer.writerow([job.name, "ok" if job.results is not None else "failed",
                         *[job.overrides.get(k, "") for k in override_keys],
                         *[job.figures.get(k, "") for k in figure_keys]])
    write_atomically(path, f.getvalue())
    return path


def write_markdown(jobs: list[Job], path: Path, title: str) -> Path:
    """Mean ± std over seeds per configuration: the headline metric of each stage, then every
    figure (rows) by configuration (columns)."""
    from kdkit.report import fmt

    groups = configurations(jobs)
    headline = headline_keys(jobs)
    failed = [job.name for job in jobs if job.results is None]
    lines = [f"# Sweep {title}", "",
             f"{len(jobs)} jobs, {len(groups)} configurations; mean ± std over seeds (sample std, n-1)."]
    if failed:
        lines.append(f"Failed (no results.json): job {', '.join(failed)}.")

    def cell(group: list[Job], key: str) -> str:
        mean, std = mean_std([job.figures[key] for job in group if key in job.figures])
        if mean is None:
            return "-"
        if std is None:
            return fmt(mean, key) + " (n=1)"
        return f"{fmt(mean, key)} ± {fmt(std, key) if std else 0}"

    lines += ["", "## Headline: " + ", ".join(f"{s}: {k.removeprefix(s + '/')}" for s, k in headline.items()), ""]
    lines.append(md_row(["configuration", "seeds", *headline]))
    lines.append(_md_rule(2 + len(headline)))
    for name, group in groups.items():
        seeds = ", ".join(job.overrides.get("seed", "?") for job in group if job.results is not None)
        n_failed = sum(job.results is None for job in group)
        seeds += f" ({n_failed} failed)" if n_failed else ""
        lines.append(md_row([name, seeds or "-", *[cell(group, k) for k in headline.values()]]))

    figure_keys = list(dict.fromkeys(k for job in jobs for k in job.figures))
    lines += ["", "## Every figure", "", md_row(["figure", *groups]), _md_rule(1 + len(groups))]
    lines += [md_row([key, *[cell(group, key) for group in groups.values()]]) for key in figure_keys]
    write_atomically(path, "\n".join(lines) + "\n")
    return path


def _md_rule(n: int) -> str:
    return "| --- |" + " ---: |" * (n - 1)


def write_plot(jobs: list[Job], path: Path) -> Path:
    """Bars of each stage's headline metric per configuration, mean with std error bars."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    groups = configurations(jobs)
    headline = headline_keys(jobs)
    width = 0.8 / max(len(headline), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 + 1.1 * len(groups) * max(len(headline), 1) * 0.6), 3.6))
    for i, (stage, key) in enumerate(headline.items()):
        stats = [mean_std([job.figures[key] for job in group if key in job.figures]) for group in groups.values()]
        xs = [g + (i - (len(headline) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [m if m is not None else 0.0 for m, _ in stats], width,
               yerr=[s or 0.0 for _, s in stats], capsize=3, label=stage)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([name.replace(" ", "\n") for name in groups], fontsize=8)
    metrics = sorted({k.rsplit("/", 1)[-1] for k in headline.values()})
    ax.set_ylabel(f"test {', '.join(metrics)} (mean ± std over seeds)")
    if headline:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    write_atomically(path, image.getvalue())
    return path
