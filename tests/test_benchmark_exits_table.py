"""``benchmarks/retrieval_exits.py`` puts every model's figures in the column of its depth: a
3-block student's cuts under 2 and 1 blocks, a dedicated 2- or 1-block student under its own."""

from __future__ import annotations

from benchmarks._common import RunLog
from benchmarks.retrieval_exits import TEACHER_CUT, cell, report, speeds


def test_cells_sit_at_the_models_depth(tmp_path):
    cut = {"name": TEACHER_CUT, "teacher_layers": 6, "test/ndcg@10": 0.5,
           "test/ndcg@10@exit1": 0.4, "test/ndcg@10@exit0": 0.3}
    exits = {"name": "multi_exit", "test/ndcg@10": 0.61, "test/ndcg@10@exit1": 0.35,
             "test/ndcg@10@exit0": 0.32, "passages_per_s": 47.6, "speedup": 2.09,
             "passages_per_s@exit0": 140.3, "speedup@exit0": 6.15}
    two = {"name": "two_layer", "test/ndcg@10": 0.62, "passages_per_s": 66.0, "speedup": 2.9}
    one = {"name": "one_layer", "test/ndcg@10": 0.55, "test/ndcg@10@exit0": 0.9}
    assert [cell(cut, d) for d in (3, 2, 1)] == ["0.500", "0.400", "0.300"]
    assert [cell(exits, d) for d in (3, 2, 1)] == ["0.610", "0.350", "0.320"]
    assert [cell(two, d) for d in (3, 2, 1)] == ["-", "0.620", "-"]
    assert [cell(one, d) for d in (3, 2, 1)] == ["-", "-", "0.550"]  # its whole model is its 1 block
    assert speeds(exits) == "47.6 (2.09x) / - / 140.3 (6.15x)"
    assert speeds(two) == "- / 66.0 (2.90x) / -"

    log = RunLog(tmp_path / "log.jsonl", key=lambda row: row["name"], archive=False)
    for row in (cut, exits, two, one):
        log.record(row)
    table = report(log, str(tmp_path), steps=300, precision="32-true")
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[1].startswith("| teacher all-MiniLM-L6-v2 cut after 3 / 2 / 1 of its 6 layers")
    assert "| two_layer: dedicated 2-block student" in lines[3] and "| - | 0.620 | - |" in lines[3]
    assert "Not run: embed, multi_exit_w1." in table
