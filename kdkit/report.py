"""Per-stage numbers beyond the test metrics: size, latency; and the summary table."""

from __future__ import annotations

import time

import torch
from torch import nn


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def latency_ms(fn, *args, warmup: int = 3, blocks: int = 5, min_block_s: float = 0.05,
               runs: int | None = None, **kwargs) -> float:
    """Per-call wall time of ``fn(*args)`` in milliseconds, robust to a busy machine.

    Calls are timed in ``blocks`` blocks of at least ``min_block_s`` each (so sub-millisecond
    calls are not dominated by timer and scheduling noise); the fastest block's mean is
    reported, since other processes can only ever add time. ``runs`` is an alias of ``blocks``.
    """
    blocks = runs or blocks
    for _ in range(warmup):
        fn(*args, **kwargs)
    start = time.perf_counter()
    fn(*args, **kwargs)
    once = max(time.perf_counter() - start, 1e-6)
    per_block = max(1, int(min_block_s / once))
    best = float("inf")
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(per_block):
            fn(*args, **kwargs)
        best = min(best, (time.perf_counter() - start) / per_block)
    return best * 1e3


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
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)
