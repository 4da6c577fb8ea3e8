"""Per-stage numbers beyond the test metrics: size, latency; and the summary table."""

from __future__ import annotations

import logging
import statistics

import torch
from torch import nn


def count_parameters(model: nn.Module) -> int:
    """How many parameters ``model`` has (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def latency_ms(fn, *args, warmup: int = 3, blocks: int = 5, min_block_s: float = 0.05,
               runs: int | None = None, **kwargs) -> float:
    """Median per-call wall time of ``fn(*args, **kwargs)`` in milliseconds.

    Timed with ``torch.utils.benchmark.Timer`` (which synchronises an accelerator around each
    block) in ``blocks`` blocks of at least ``min_block_s`` seconds each, so sub-millisecond
    calls are measured, not the clock; the median block is reported. The fastest of a few blocks
    (what this reported before) let one lucky block decide: the same model measured 0.069 and
    0.112 ms in one run. Fixed-size blocks keep the cost at about ``blocks * min_block_s``
    seconds (``blocked_autorange`` spent 1.3 s sizing blocks for a 6 us call). ``runs`` is an
    alias of ``blocks``; the torch thread count in effect is kept (Timer would use one thread).
    """
    blocks = max(runs or blocks, 1)
    for _ in range(warmup):  # lazy initialisation, autotuning and caches before the clock starts
        fn(*args, **kwargs)
    timer = _benchmark_timer()("fn(*args, **kwargs)", num_threads=torch.get_num_threads(),
                               globals={"fn": fn, "args": args, "kwargs": kwargs})
    number = 1  # calls per calibration block: grow until the clock's overhead is a tenth or less
    while True:
        once = max(timer.timeit(number).mean, 1e-9)
        if once * number >= min_block_s / 10 or number >= 10**6:
            break
        number *= 10
    per_block = max(1, round(min_block_s / once))
    return statistics.median(timer.timeit(per_block).mean for _ in range(blocks)) * 1e3


def _benchmark_timer():
    """``torch.utils.benchmark.Timer``, imported without its import-time warning: it imports
    ``torch.utils.cpp_extension``, which warns "No CUDA runtime is found" on machines with a
    CUDA toolkit but no GPU, a line that would otherwise appear under the first stage's bars."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils.benchmark import Timer
    finally:
        logger.setLevel(level)
    return Timer


def table_cells(results: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """The summary table as text: its header (``metric``, then one column per stage) and one
    row per numeric metric (in order of first appearance), each figure formatted by ``fmt``."""
    rows: list[str] = []
    for metrics in results.values():
        rows += [k for k, v in metrics.items() if k not in rows and isinstance(v, (int, float))]
    header = ["metric", *results]
    return header, [[row, *[fmt(metrics.get(row), row) for metrics in results.values()]] for row in rows]


def format_table(results: dict[str, dict], title: str = "kdkit results"):
    """A rich Table: one row per metric, one column per stage (stays narrow for any metric set)."""
    from rich.table import Table

    header, rows = table_cells(results)
    table = Table(title=title)
    table.add_column(header[0])
    for stage in header[1:]:
        table.add_column(stage, justify="right")
    for row in rows:
        table.add_row(*row)
    return table


def markdown_table(results: dict[str, dict], title: str = "kdkit results") -> str:
    """The console table as Markdown (``results.md``): same rows, columns and figures."""
    header, rows = table_cells(results)
    lines = [f"## {title}", "", md_row(header), "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|"]
    lines += [md_row(row) for row in rows]
    return "\n".join(lines) + "\n"


def md_row(cells: list) -> str:
    """One Markdown table row; a ``|`` inside a cell is escaped."""
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def fmt(value, key: str = "") -> str:
    """One figure for people, by what ``key`` measures: seconds with one decimal, latencies
    (``*_ms``) with three significant digits, rates (``*_per_s``) with one decimal, counts with
    thousands separators, other metrics with four decimals."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if not isinstance(value, (int, float)):
        return str(value)
    name = key.rsplit("/", 1)[-1]
    if name.endswith("seconds") or (name.endswith("_s") and not name.endswith("per_s")):
        return f"{value:,.1f}"
    if name.endswith("_ms"):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:#.3g}"
    if name.endswith("per_s"):
        return f"{value:,.1f}"
    if isinstance(value, int) or (value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"  # counts, also when a logger turned them into floats
    return f"{value:,.4f}"
