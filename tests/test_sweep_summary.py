"""A real two-seed sweep of the digits demo, summarized by the Hydra callback."""

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from kdkit.errors import KdkitError
from kdkit.sweep_summary import summarize_sweep

FAST = ["trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.enable_progress_bar=false",
        "report.latency_batch_size=16"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    sweep_dir = root / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", "from kdkit.train import main; main()", "-m", *FAST, "seed=0,1",
           f"hydra.sweep.dir={sweep_dir}"]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kdkit: sweep summary:" in done.stderr
    return sweep_dir


def _results(job: Path) -> dict:
    return json.loads((job / "results.json").read_text())


def test_summary_md_has_mean_and_std_over_seeds(sweep):
    accs = {stage: [_results(sweep / j)[stage]["test/acc"] for j in ("0", "1")]
            for stage in ("teacher", "baseline", "student")}
    expected = " | ".join(f"{statistics.fmean(v):.4f} ± {statistics.stdev(v):.4f}" for v in accs.values())
    config = " ".join(o for o in FAST)
    rows = [line for line in (sweep / "summary.md").read_text().splitlines() if line.startswith("| trainer.")]
    hydra_written = [line.split(" | ")[0].removeprefix("| ") for line in rows]
    assert len(rows) == 1, rows  # both seeds are one configuration
    assert rows[0].endswith(f"| 0, 1 | {expected} |"), (rows[0], expected)
    assert hydra_written[0].replace("False", "false") == config


def test_summary_csv_has_one_row_per_job_with_every_figure(sweep):
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["status"], r["seed"]) for r in rows] == [("0", "ok", "0"), ("1", "ok", "1")]
    for row in rows:
        results = _results(sweep / row["job"])
        assert float(row["student/test/acc"]) == results["student"]["test/acc"]
        assert int(row["baseline/params"]) == results["baseline"]["params"]
        assert float(row["teacher/latency_ms"]) == results["teacher"]["latency_ms"]


def test_summary_png_is_a_picture(sweep):
    data = (sweep / "summary.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_a_failed_job_is_listed_not_dropped(sweep, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    failed = copy / "2"
    (failed / ".hydra").mkdir(parents=True)
    shutil.copy(copy / "1" / ".hydra" / "overrides.yaml", failed / ".hydra" / "overrides.yaml")
    text = (failed / ".hydra" / "overrides.yaml").read_text().replace("seed=1", "seed=2")
    (failed / ".hydra" / "overrides.yaml").write_text(text)
    paths = summarize_sweep(copy)
    with paths["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["status"], r["seed"]) for r in rows][-1] == ("2", "failed", "2")
    assert rows[-1]["student/test/acc"] == ""
    md = paths["md"].read_text()
    assert "Failed (no results.json): job 2." in md and "| 0, 1 (1 failed) |" in md
    # the mean and std are those of the jobs that finished
    assert (sweep / "summary.md").read_text().split("## Every figure")[1] == md.split("## Every figure")[1]


def test_overrides_come_from_config_yaml_without_hydra_files(sweep, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    for job in ("0", "1"):
        shutil.rmtree(copy / job / ".hydra")
    paths = summarize_sweep(copy)
    with paths["csv"].open() as f:
        rows = list(csv.DictReader(f))
    # seed differs, and so does its resolved copy data.seed, which is no configuration of its own
    assert [(r["job"], r["seed"]) for r in rows] == [("0", "0"), ("1", "1")]
    assert "| - | 0, 1 |" in paths["md"].read_text()


def test_a_directory_without_jobs_is_a_user_error(tmp_path):
    with pytest.raises(KdkitError, match="no multirun jobs"):
        summarize_sweep(tmp_path)


def test_a_sweep_stopped_by_a_user_mistake_still_summarizes_its_jobs(tmp_path):
    """A real failure: the second job's config is refused (max_epochs=0), which ends the sweep
    with exit 2 before Hydra's end-of-sweep callback; the jobs so far are still summarized."""
    sweep_dir = tmp_path / "sweep"
    fast = [o for o in FAST if not o.startswith("trainer.max_epochs")]
    cmd = [sys.executable, "-c", "from kdkit.train import main; main()", "-m", *fast,
           "stages.teacher=false", "stages.student=false", "trainer.max_epochs=1,0",
           f"hydra.sweep.dir={sweep_dir}"]
    done = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "kdkit: error: trainer.max_epochs=0" in done.stderr and "Traceback" not in done.stderr
    with (sweep_dir / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["status"]) for r in rows] == [("0", "ok"), ("1", "failed")]
    assert float(rows[0]["baseline/test/acc"]) == _results(sweep_dir / "0")["baseline"]["test/acc"]
