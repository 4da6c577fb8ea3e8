import time

from kdkit.report import format_table, latency_ms


def test_latency_reports_the_per_call_time():
    ms = latency_ms(time.sleep, 0.002, blocks=3, min_block_s=0.02)
    assert 2.0 <= ms < 6.0  # sleep(2 ms) can only take longer, never shorter


def test_table_has_a_column_per_stage_and_row_per_metric():
    table = format_table({"teacher": {"test/acc": 0.9, "params": 100}, "student": {"test/acc": 0.8}})
    assert [c.header for c in table.columns] == ["metric", "teacher", "student"]
    assert table.row_count == 2
