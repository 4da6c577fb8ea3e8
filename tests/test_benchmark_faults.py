"""benchmarks/faults.py --merge: rerun cases replace their rows in an earlier full run's table,
whose header (and work dir) the new table names."""

import json

from benchmarks.faults import earlier_run, report
from tests.faults.cases import Outcome


def test_a_merged_table_keeps_the_earlier_rows_and_names_the_full_run(tmp_path):
    earlier_dir = tmp_path / "full"
    earlier_dir.mkdir()
    rows = [Outcome("case a", "0", f"wrote {earlier_dir}/run/a", "none", 1.0),
            Outcome("case b", "1", "old", "lost", 2.0, failures=["broken"])]
    (earlier_dir / "outcomes.jsonl").write_text("".join(json.dumps(o.__dict__) + "\n" for o in rows))
    table = tmp_path / "faults.md"
    table.write_text("# t\n\n- command: `python benchmarks/faults.py --workdir full`\n- date: 2026-12-07 17:35\n")

    earlier, header = earlier_run(earlier_dir / "outcomes.jsonl", table)
    assert [o.case for o in earlier] == ["case a", "case b"] and not earlier[1].ok
    assert header == ["- command: `python benchmarks/faults.py --workdir full`", "- date: 2026-12-07 17:35"]

    fresh = {"case b": Outcome("case b", "0", "fixed", "none", 3.0)}
    merged = [fresh.get(o.case, o) for o in earlier]
    text = report(merged, tmp_path / "rerun", 4.0, rerun=["case b"], earlier=header, earlier_dir=earlier_dir)
    assert "2 pass every check" in text
    assert "| case a | 0 | wrote <earlier work>/run/a | none | 1.0 | pass |" in text
    assert "| case b | 0 | fixed | none | 3.0 | pass |" in text
    assert "  - command: `python benchmarks/faults.py --workdir full`" in text

    table.write_text(text)  # merging into a merged table still names the full run
    assert earlier_run(earlier_dir / "outcomes.jsonl", table)[1] == header
