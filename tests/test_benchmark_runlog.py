"""benchmarks._common.RunLog keeps a committed copy of a run log under benchmarks/runs/, so a
fresh machine (an empty benchmarks/runs/) resumes instead of rewriting results without rows."""

import json
import math
import shutil

import pytest

from benchmarks import _common
from benchmarks._common import RunLog, archive_of, paired_delta


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    runs, raw = tmp_path / "runs", tmp_path / "results" / "raw"
    monkeypatch.setattr(_common, "RUNS", runs)
    monkeypatch.setattr(_common, "RAW", raw)
    return runs, raw


def key(row):
    return row["name"]


def test_archive_names_follow_the_run_folder(dirs, tmp_path):
    runs, raw = dirs
    assert archive_of(runs / "teacher_data" / "results.jsonl") == raw / "teacher_data.jsonl"
    assert archive_of(runs / "vit" / "part" / "log.jsonl") == raw / "vit__part.jsonl"
    assert archive_of(tmp_path / "elsewhere" / "log.jsonl") is None


def test_rows_survive_the_loss_of_the_runs_folder(dirs):
    runs, raw = dirs
    log = RunLog(runs / "bench" / "log.jsonl", key)
    log.record({"name": "a", "acc": 0.5})
    log.record({"name": "b", "acc": 0.6})
    log.record({"name": "a", "acc": 0.7})  # a rerun: the later line wins
    shutil.rmtree(runs)  # the machine is gone, the committed copy stays

    fresh = RunLog(runs / "bench" / "log.jsonl", key)
    assert fresh.done == {"a": {"name": "a", "acc": 0.7}, "b": {"name": "b", "acc": 0.6}}
    fresh.record({"name": "c", "acc": 0.8})
    assert [json.loads(line)["name"] for line in (runs / "bench" / "log.jsonl").read_text().splitlines()] == ["c"]
    assert [json.loads(line)["name"] for line in (raw / "bench.jsonl").read_text().splitlines()] == ["a", "b", "a", "c"]


def test_a_log_from_before_the_copy_is_copied_once(dirs):
    runs, raw = dirs
    path = runs / "old" / "log.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"name": "x", "v": 1}) + "\n")
    RunLog(path, key)
    RunLog(path, key)
    assert (raw / "old.jsonl").read_text().splitlines() == [json.dumps({"name": "x", "v": 1})]


def test_logs_outside_the_runs_folder_are_not_copied(dirs, tmp_path):
    runs, raw = dirs
    log = RunLog(tmp_path / "mine" / "log.jsonl", key)
    log.record({"name": "a"})
    assert log.archive is None and not raw.exists()


def test_reports_name_the_committed_copy_of_a_runs_log(dirs, tmp_path):
    runs, raw = dirs
    assert _common.raw_rows(runs / "retrieval_exits") == (
        f"Raw rows: `{runs / 'retrieval_exits' / 'log.jsonl'}` (committed copy: `{raw / 'retrieval_exits.jsonl'}`).")
    assert _common.raw_rows(tmp_path / "mine") == f"Raw rows: `{tmp_path / 'mine' / 'log.jsonl'}`."


def test_restored_rows_name_their_source_and_commands():
    rows = [{"name": "a", "restored_from": "restored from X", "source_commands": ["cmd 1", "cmd 2"]},
            {"name": "b", "restored_from": "restored from X", "source_commands": ["cmd 2"]},
            {"name": "c", "command": "cmd 3"}]
    assert _common.restored_note(rows) == ["Rows restored from X.", ""]
    assert _common.restored_note(rows, commands=True) == [
        "Rows restored from X.", "Their commands: `cmd 1`; `cmd 2`.", ""]
    assert _common.restored_note(rows[2:], commands=True) == []


def test_a_failing_run_does_not_hold_back_the_others_rows(monkeypatch, capsys):
    def fake_run(job):
        if job[0] == "bad":
            raise ValueError("resume refused")
        return {"method": job[0], "seed": job[1]}

    monkeypatch.setattr(_common, "run_student", fake_run)
    jobs = [("bad", 0, [], "runs/bad_s0"), ("good", 0, [], "runs/good_s0"), ("also", 1, [], "runs/also_s1")]
    rows = []
    with pytest.raises(RuntimeError, match=r"1 of 3 runs failed") as err:
        for row in _common.run_all_jobs(jobs, 1, 1):
            rows.append(row)
    assert rows == [{"method": "good", "seed": 0}, {"method": "also", "seed": 1}]
    assert "bad seed 0 (runs/bad_s0): ValueError: resume refused" in str(err.value)
    assert "run failed: bad seed 0" in capsys.readouterr().err  # said when it happens, not only at the end


@pytest.mark.parametrize("threads", [1, 2])
def test_a_row_names_the_thread_count_its_run_had(monkeypatch, tmp_path, threads):
    """Rows of ``--jobs 2`` train in one-thread workers while their driver keeps its own count:
    the row's machine line must give the run's."""
    import torch

    import kdkit.compose
    import kdkit.pipeline

    seen = {}

    def fake_run(cfg):
        seen["threads"] = torch.get_num_threads()
        return {"student": {"test/acc": 0.5}}

    monkeypatch.setattr(kdkit.compose, "compose", lambda over, output_dir: over)
    monkeypatch.setattr(kdkit.pipeline, "run", fake_run)
    before = torch.get_num_threads()
    try:
        row = _common.run_student(("kd", 0, [], str(tmp_path), threads))
    finally:
        torch.set_num_threads(before)
    assert seen["threads"] == threads
    assert f"{threads} torch threads" in row["machine"]


def test_a_row_measures_its_student_or_else_its_baseline_whatever_the_row_is_called():
    from benchmarks._common import row_stage

    teacher, base, student = {"test/acc": 0.81}, {"test/acc": 0.6}, {"test/acc": 0.7}
    assert row_stage({"teacher": teacher, "student": student}) == "student"
    assert row_stage({"teacher": teacher, "baseline": base}) == "baseline"  # e.g. baseline_strong_aug
    assert row_stage({"baseline": base, "student": student}) == "student"
    with pytest.raises(KeyError, match="only.*teacher"):
        row_stage({"teacher": teacher})


def test_a_row_is_compared_with_the_baseline_at_its_own_seeds():
    baseline = {0: 0.6541, 1: 0.6619}
    assert paired_delta([{"seed": 0, "test/acc": 0.7606}], baseline) == pytest.approx(0.7606 - 0.6541)
    assert paired_delta([{"seed": 0, "test/acc": 0.68}, {"seed": 1, "test/acc": 0.70}], baseline) == \
        pytest.approx(0.69 - (0.6541 + 0.6619) / 2)
    # a seed the baseline lacks: against all of the baseline's seeds
    assert paired_delta([{"seed": 2, "test/acc": 0.70}], baseline) == pytest.approx(0.70 - (0.6541 + 0.6619) / 2)
    assert math.isnan(paired_delta([{"seed": 0, "test/acc": 0.70}], {}))  # no baseline at all
