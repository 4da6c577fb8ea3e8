import time

import torch
from torch import nn

from kdkit.report import fmt, format_table, latency_ms, markdown_table, table_cells


def test_latency_reports_the_per_call_time():
    ms = latency_ms(time.sleep, 0.002, blocks=3, min_block_s=0.02)
    assert 2.0 <= ms < 6.0  # sleep(2 ms) can only take longer, never shorter


class _ScriptedTimer:
    """Stands in for ``torch.utils.benchmark.Timer``: each ``timeit`` returns the next scripted
    per-call time, so what ``latency_ms`` makes of noisy blocks is checked without a clock (a
    real two-measurement comparison failed CI at 1.43x under the two test workers' load)."""

    def __init__(self, means):
        self.means, self.numbers = iter(means), []

    def __call__(self, *args, **kwargs):
        return self

    def timeit(self, number):
        self.numbers.append(number)
        return type("Measurement", (), {"mean": next(self.means)})()


def test_latency_is_the_median_block_so_one_disturbed_block_does_not_move_it(monkeypatch):
    # calibration: 1 call of 1 ms is under min_block_s / 10 = 5 ms, 10 calls are not; then five
    # blocks, one slowed 3x by another process and one lucky: the typical 1 ms stands
    timer = _ScriptedTimer([1e-3, 1e-3, 1e-3, 3e-3, 0.6e-3, 1.02e-3, 0.98e-3])
    monkeypatch.setattr("kdkit.report._benchmark_timer", lambda: timer)
    ms = latency_ms(lambda: None, warmup=0, blocks=5, min_block_s=0.05)
    assert ms == 1.0
    assert timer.numbers == [1, 10, 50, 50, 50, 50, 50]  # each block sized to min_block_s


def test_latency_passes_keyword_arguments_and_keeps_the_thread_count():
    threads = torch.get_num_threads()
    seen = []
    ms = latency_ms(lambda *, scale: seen.append(scale), scale=3, blocks=1, min_block_s=0.01)
    assert ms > 0 and set(seen) == {3} and len(seen) > 3
    assert torch.get_num_threads() == threads


def test_table_has_a_column_per_stage_and_row_per_metric():
    table = format_table({"teacher": {"test/acc": 0.9, "params": 100}, "student": {"test/acc": 0.8}})
    assert [c.header for c in table.columns] == ["metric", "teacher", "student"]
    assert table.row_count == 2


def test_figures_are_formatted_by_what_they_measure():
    assert fmt(4.8, "fit_seconds") == "4.8"
    assert fmt(0.0599, "latency_ms") == "0.0599"
    assert fmt(8.29158, "latency_ms") == "8.29"
    assert fmt(8.0, "latency_full_ms") == "8.00"
    assert fmt(1234.5, "latency_inductive_ms") == "1,234"
    assert fmt(94186, "params") == "94,186"
    assert fmt(1797.0, "test/count") == "1,797"  # a count the logger turned into a float
    assert fmt(0.963788, "test/acc") == "0.9638"
    assert fmt(1234.56, "images_per_s") == "1,234.6"
    assert fmt(True, "weaker_than_baseline") == "yes"
    assert fmt(None, "test/acc") == "-"


def test_markdown_table_has_the_console_tables_rows_and_figures():
    results = {"teacher": {"test/acc": 0.96378, "params": 94186, "latency_ms": 8.2916, "fit_seconds": 0.5},
               "student": {"test/acc": 0.9025, "params": 2410, "latency_ms": 0.0576}}
    text = markdown_table(results, title="demo")
    lines = text.splitlines()
    assert lines[0] == "## demo"
    assert lines[2] == "| metric | teacher | student |"
    assert lines[4:] == ["| test/acc | 0.9638 | 0.9025 |", "| params | 94,186 | 2,410 |",
                         "| latency_ms | 8.29 | 0.0576 |", "| fit_seconds | 0.5 | - |"]
    header, rows = table_cells(results)
    table = format_table(results)
    assert [c.header for c in table.columns] == header and table.row_count == len(rows)
