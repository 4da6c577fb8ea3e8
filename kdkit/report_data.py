"""What a run directory holds, read for the HTML report: results, config, per-stage curves.

Everything here is forgiving about what is missing (a stage without ``metrics.csv``, a
metric one stage lacks, an unreadable log): each gap becomes a note in ``RunData.notes``
instead of an error, since a report is most wanted for runs that went partly wrong. Only a
directory that is not a run directory at all (no readable ``results.json``) is refused.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from kdkit.errors import KdkitError, unreadable


@dataclass
class Curve:
    """One logged column of one stage's ``metrics.csv``: its values ``y`` in log order, with
    the ``step`` and ``epoch`` (None where the row has none) each was logged at."""

    stage: str
    metric: str
    step: list = field(default_factory=list)
    epoch: list = field(default_factory=list)
    y: list = field(default_factory=list)


@dataclass
class RunData:
    """A run directory, read: ``results`` as in ``results.json`` (stage order kept),
    ``config`` (parsed ``config.yaml``, {} when absent) and its text, ``curves[stage][metric]``,
    and ``notes`` (one sentence per thing missing or unreadable)."""

    directory: Path
    results: dict[str, dict]
    config: dict
    config_text: str | None
    curves: dict[str, dict[str, Curve]]
    notes: list[str]

    @property
    def stages(self) -> list[str]:
        """Stages in report order: those of ``results.json``, then stages with logs only."""
        return [*self.results, *(s for s in self.curves if s not in self.results)]


def stage_file_name(stage: str) -> str:
    """The file/directory name of a results key: ``teacher/big`` -> ``teacher-big``,
    ``student/gen2`` -> ``student-gen2`` (as ``kdkit.teachers.stage_name`` and the pipeline)."""
    return stage.replace("/", "-")


def is_number(value) -> bool:
    """A finite int or float that is not a bool (bools are facts, not measurements)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_run(directory) -> RunData:
    """Read the run directory ``directory``; KdkitError when it has no readable results.json."""
    directory = Path(directory)
    path = directory / "results.json"
    if not path.is_file():
        raise KdkitError(f"{directory} is not a kdkit run directory (no results.json)")
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise unreadable(path, "run results", err) from None
    if not isinstance(results, dict):
        raise unreadable(path, "run results", "not a JSON object of stages")
    notes: list[str] = []
    results = {str(k): v for k, v in results.items() if isinstance(v, dict)}
    config, config_text = _load_config(directory / "config.yaml", notes)
    for stage in results:
        if not (directory / "stages" / f"{stage_file_name(stage)}.json").is_file():
            notes.append(f"stage '{stage}': no stages/{stage_file_name(stage)}.json "
                         "(its numbers come from results.json alone)")
    return RunData(directory, results, config, config_text,
                   _load_all_curves(directory, list(results), notes), notes)


def _load_config(path: Path, notes: list[str]) -> tuple[dict, str | None]:
    """The parsed config ({} when absent or unparsable) and its text (None when unreadable)."""
    import yaml

    if not path.is_file():
        notes.append("no config.yaml in the run directory")
        return {}, None
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        notes.append(f"config.yaml is unreadable ({type(err).__name__})")
        return {}, None
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError as err:  # shown as text anyway; only setting-specific labels need it parsed
        notes.append(f"config.yaml does not parse as YAML ({type(err).__name__})")
        return {}, text
    return (parsed if isinstance(parsed, dict) else {}), text


def _load_all_curves(directory: Path, stages: list[str], notes: list[str]) -> dict[str, dict[str, Curve]]:
    """Curves of every stage of ``results.json``, and of stages that only left logs (e.g. a
    teacher trained while ``stages.teacher=false``)."""
    logs = directory / "logs"
    names = {stage_file_name(s): s for s in stages}
    if logs.is_dir():
        for sub in sorted(p.name for p in logs.iterdir() if (p / "metrics.csv").is_file()):
            names.setdefault(sub, sub)
    curves: dict[str, dict[str, Curve]] = {}
    for file_name, stage in names.items():
        path = logs / file_name / "metrics.csv"
        if not path.is_file():
            notes.append(f"stage '{stage}': no logs/{file_name}/metrics.csv, so no learning curves")
            continue
        try:
            curves[stage] = read_curves(path, stage)
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            notes.append(f"stage '{stage}': logs/{file_name}/metrics.csv is unreadable ({err})")
            continue
        if not curves[stage]:
            notes.append(f"stage '{stage}': logs/{file_name}/metrics.csv has no train/ or val/ values")
    return curves


def read_curves(path, stage: str) -> dict[str, Curve]:
    """The ``train/*`` and ``val/*`` columns of a Lightning ``metrics.csv`` as curves (rows
    without a step, and empty or non-finite cells, are skipped)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = list(rows[0].keys()) if rows else []
    curves: dict[str, Curve] = {}
    for column in columns:
        if not column or not column.startswith(("train/", "val/")):
            continue
        curve = Curve(stage, column)
        for row in rows:
            value, step = _num(row.get(column)), _num(row.get("step"))
            if value is not None and step is not None:
                curve.step.append(step)
                curve.epoch.append(_num(row.get("epoch")))
                curve.y.append(value)
        if curve.y:
            curves[column] = curve
    return curves


def _num(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
