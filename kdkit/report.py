"""Per-stage numbers beyond the test metrics: size, latency; and the summary table."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def latency_ms(fn, *args, warmup: int = 3, runs: int = 20, **kwargs) -> float:
    """Median wall time of ``fn(*args)`` in milliseconds (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn(*args, **kwargs)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(*args, **kwargs)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def format_table(results: dict[str, dict], title: str = "kdkit results"):
    """A rich Table: one row per metric, one column per stage (stays narrow for any metric set)."""
    from rich.table import Table

    rows: list[str] = []
    for metrics in results.values():
        rows += [k for k, v in metrics.items() if k not in rows and isinstance(v, (int, float))]
    table = Table(title=title)
    table.add_column("metric")
    for stage in results:
        table.add_column(stage, justify="right")
    for row in rows:
        table.add_row(row, *[_fmt(metrics.get(row)) for metrics in results.values()])
    return table


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)
