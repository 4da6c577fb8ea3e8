"""Shared pieces of the benchmark scripts: machine facts, mean ± std, markdown writing."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                     if line.startswith("model name"))
        cpu = model
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.node()}: {os.cpu_count()} cores ({cpu}), {gpu}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads; Python {platform.python_version()}")


def command() -> str:
    return " ".join(["python", *sys.argv])


def header(title: str) -> str:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).parent).stdout.strip() or "unknown"
    return (f"# {title}\n\n- command: `{command()}`\n- date: {dt.datetime.now():%Y-%m-%d %H:%M}\n"
            f"- machine: {machine()}\n- kdkit commit: {rev}\n")


def mean_std(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "-"
    m = statistics.mean(values) * scale
    if len(values) == 1:
        return f"{m:.2f}"
    return f"{m:.2f} ± {statistics.stdev(values) * scale:.2f}"


class RunLog:
    """Finished benchmark runs, one JSON line each in ``path``, so an interrupted benchmark
    resumes where it stopped. ``done`` maps ``key(row)`` to the row (a later line wins)."""

    def __init__(self, path: Path, key):
        self.path, self.key = Path(path), key
        self.done: dict = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                row = json.loads(line)
                self.done[key(row)] = row

    def record(self, row: dict) -> dict:
        self.done[self.key(row)] = row
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return row


def write(name: str, text: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(text)
    print(f"wrote {path}")
    return path
