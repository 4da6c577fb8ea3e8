"""report.html: a real run's page in a real browser, the kdkit-report CLI, and the data that
ends up in each plot (from hand-written run directories with known numbers).

The browser test uses Debian's chromium through playwright; without them it parses the page
and decodes every embedded image instead, unless KDKIT_REQUIRE_BROWSER=1 (CI), where a missing
browser fails.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from kdkit.errors import KdkitError
from kdkit.html_report import render_report, write_report
from kdkit.report import fmt
from kdkit.report_cli import main
from kdkit.report_data import load_run
from kdkit.report_plan import headline_key, plan

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("KDKIT_CHROMIUM", "/usr/bin/chromium")  # Debian's; elsewhere set it
# without the background-networking switches chromium waits on the closed network at start-up
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DIGITS = [
    "trainer.max_epochs=2", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=2", "trainer.enable_progress_bar=false", "callbacks=none",
    "report.latency_batch_size=8", "trainer.log_every_n_steps=1",  # 3 steps: log each one
]
# what the digits demo's page must show (figure ids: kdkit.report_plan)
DIGITS_PLOTS = ["bar-headline", "bar-latency", "scatter-params", "scatter-latency_ms",
                "curve-train-loss", "curve-train-loss-task", "curve-train-loss-kd", "curve-val-acc"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """A real (tiny) digits demo run directory: teacher, baseline, distilled student."""
    from kdkit.compose import run

    out = tmp_path_factory.mktemp("digits") / "run"
    run(DIGITS, output_dir=str(out))
    return out


# ---- the real run in a browser ------------------------------------------------------------
def _playwright():
    """playwright's sync API, or None (with the reason) when it or chromium is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None, "playwright is not installed (pip install playwright)"
    if not os.path.exists(CHROMIUM):
        return None, f"{CHROMIUM} not found (apt-get install chromium)"
    return sync_playwright, ""


def test_report_renders_in_a_browser(digits_run):
    page_path = write_report(digits_run)
    assert page_path == digits_run / "report.html"
    results = json.loads((digits_run / "results.json").read_text())
    _check_static(page_path.read_text())
    cpu = json.loads((digits_run / "environment.json").read_text())["starts"][0]["cpu_capability"]
    assert f"({cpu}), " in html.unescape(page_path.read_text())  # one start: its line, shut
    sync_playwright, missing = _playwright()
    if sync_playwright is None:
        if os.environ.get("KDKIT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"KDKIT_REQUIRE_BROWSER=1 but {missing}")
        return  # _check_static decoded every image already
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        try:
            page = browser.new_page()
            problems: list[str] = []
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url[:80]}"))
            page.goto(page_path.resolve().as_uri(), wait_until="load", timeout=30_000)
            images = page.evaluate("""() => Array.from(document.images).map(i => ({
                figure: i.closest('figure') ? i.closest('figure').id : null,
                complete: i.complete, w: i.naturalWidth, h: i.naturalHeight,
                shown: i.getBoundingClientRect().width}))""")
            svgs = page.evaluate("""() => Array.from(document.querySelectorAll('svg')).map(s => {
                const b = s.getBoundingClientRect(); return b.width * b.height; })""")
            ids = page.evaluate("() => Array.from(document.querySelectorAll('figure.plot')).map(f => f.id)")
            table = page.evaluate("""() => Array.from(document.querySelectorAll('#results-table tr'))
                .map(r => Array.from(r.children).map(c => c.textContent))""")
            page.click("#config summary")  # the config is collapsed until asked for
            config_open = page.evaluate("() => document.querySelector('details#config').open")
            config_text = page.inner_text("details#config pre")
        finally:
            browser.close()
    assert not problems, problems
    assert images and all(i["complete"] and i["w"] > 0 and i["h"] > 0 and i["shown"] > 0
                          for i in images), images
    assert all(area > 0 for area in svgs)
    assert [i for i in DIGITS_PLOTS if i not in ids] == [], ids
    assert {i["figure"] for i in images} == set(ids)  # every plot's image decoded
    header, rows = table[0], {r[0]: r[1:] for r in table[1:]}
    assert header == ["metric", *results]
    assert rows["test/acc"] == [fmt(results[s]["test/acc"], "test/acc") for s in results]
    assert config_open and "max_epochs: 2" in config_text


class _Page(HTMLParser):
    """Figure ids, image sources, and any reference the page would fetch from elsewhere."""

    def __init__(self):
        super().__init__()
        self.figures, self.images, self.external, self.details = [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure":
            self.figures.append(attrs.get("id"))
        if tag == "details":
            self.details.append(attrs.get("id"))
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for key in ("src", "href"):
            if attrs.get(key) and not attrs[key].startswith(("data:", "#")):
                self.external.append(attrs[key])
        if tag in ("link", "script"):
            self.external.append(tag)


def _check_static(page: str) -> None:
    """Without a browser: the page fetches nothing and every embedded PNG decodes."""
    from PIL import Image

    parsed = _Page()
    parsed.feed(page)
    assert parsed.external == []
    assert "config" in parsed.details
    assert [i for i in DIGITS_PLOTS if i not in parsed.figures] == []
    assert len(parsed.images) == len(parsed.figures)
    for src in parsed.images:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
            image.load()
            assert image.width > 0 and image.height > 0


# ---- the command line ---------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "kdkit.report_cli", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)


def test_cli_rebuilds_the_report(digits_run, tmp_path, capsys):
    (digits_run / "report.html").unlink(missing_ok=True)
    done = _cli(str(digits_run))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(digits_run / "report.html")
    assert "bar-headline" in (digits_run / "report.html").read_text()
    elsewhere = tmp_path / "out" / "page.html"  # in-process: a second interpreter start costs seconds
    assert main([str(digits_run), "--output", str(elsewhere)]) == 0
    assert elsewhere.is_file() and capsys.readouterr().out.strip() == str(elsewhere)
    assert main([str(digits_run), str(digits_run), "--output", str(elsewhere)]) == 2
    assert capsys.readouterr().err.startswith("kdkit-report: error: --output takes one run directory")


def test_cli_refuses_a_directory_that_is_not_a_run(tmp_path):
    done = _cli(str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"kdkit-report: error: {tmp_path} is not a kdkit run "
                                        "directory (no results.json)"]
    assert done.stdout == ""


# ---- hand-written run directories: the numbers that end up in the plots -----------------
def _write_run(directory: Path, results: dict, logs: dict[str, str] | None = None,
               config: str = "name: tiny\nseed: 0\n") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.json").write_text(json.dumps(results))
    (directory / "config.yaml").write_text(config)
    for stage, values in results.items():
        (directory / "stages").mkdir(exist_ok=True)
        (directory / "stages" / f"{stage.replace('/', '-')}.json").write_text(json.dumps(values))
    for stage_dir, text in (logs or {}).items():
        (directory / "logs" / stage_dir).mkdir(parents=True, exist_ok=True)
        (directory / "logs" / stage_dir / "metrics.csv").write_text(text)
    return directory


# as Lightning's CSV logger writes them: lr rows without epoch, train rows per step, val per epoch
BASELINE_CSV = """epoch,lr-SGD,step,test/acc,train/loss,train/loss/task,val/acc
,0.05,0,,,,
0,,4,,2.5,2.5,
0,,7,,,,0.5
1,,9,,1.5,1.5,
1,,15,,,,0.75
2,,16,0.7,,,
"""
STUDENT_CSV = """epoch,step,train/loss,train/loss/kd,val/acc
0,4,3.0,1.0,
0,7,,,0.25
0,7,,,0.5
"""
CLASSIFICATION = {
    "teacher/big": {"test/acc": 0.9, "params": 1000, "latency_ms": 2.0, "primary_metric": "acc"},
    "baseline": {"test/acc": 0.6, "params": 10, "latency_ms": 0.5, "primary_metric": "acc"},
    "student": {"test/acc": 0.7, "params": 10, "latency_ms": 0.5, "primary_metric": "acc"},
    "student/gen2": {"test/acc": 0.75, "params": 10, "primary_metric": "acc"},  # no latency
}


def _plots(directory: Path) -> dict:
    return {p.id: p for p in plan(load_run(directory))}


def _points(plot) -> dict:
    return {s.label: (s.x, s.y) for s in plot.series}


def test_curve_points_are_the_logged_values(tmp_path):
    run = _write_run(tmp_path / "run", CLASSIFICATION,
                     {"baseline": BASELINE_CSV, "student": STUDENT_CSV})
    plots = _plots(run)
    assert _points(plots["curve-train-loss"]) == {"baseline": ([4.0, 9.0], [2.5, 1.5]),
                                                  "student": ([4.0], [3.0])}
    assert _points(plots["curve-train-loss-kd"]) == {"student": ([4.0], [1.0])}
    assert plots["curve-train-loss"].xlabel == "step"
    # the student validated twice in epoch 0: validation is drawn against steps, for every stage
    assert plots["curve-val-acc"].xlabel == "step"
    assert _points(plots["curve-val-acc"]) == {"baseline": ([7.0, 15.0], [0.5, 0.75]),
                                               "student": ([7.0, 7.0], [0.25, 0.5])}
    assert not any(i.startswith("curve-test") or "lr" in i for i in plots)  # test/lr columns: not curves


def test_validation_is_drawn_per_epoch(tmp_path):
    run = _write_run(tmp_path / "run", CLASSIFICATION, {"baseline": BASELINE_CSV})
    plot = _plots(run)["curve-val-acc"]
    assert plot.xlabel == "epoch" and _points(plot) == {"baseline": ([0.0, 1.0], [0.5, 0.75])}


def test_headline_bars_and_tradeoffs(tmp_path):
    plots = _plots(_write_run(tmp_path / "run", CLASSIFICATION))
    assert _points(plots["bar-headline"]) == {
        "teacher/big": (["test/acc"], [0.9]), "baseline": (["test/acc"], [0.6]),
        "student": (["test/acc"], [0.7]), "student/gen2": (["test/acc"], [0.75])}
    assert [s.role for s in plots["bar-headline"].series] == ["teacher", "baseline", "student", "student"]
    assert _points(plots["scatter-params"]) == {
        "teacher/big": ([1000], [0.9]), "baseline": ([10], [0.6]), "student": ([10], [0.7]),
        "student/gen2": ([10], [0.75])}
    assert plots["scatter-params"].logx  # 100x apart
    # a stage without a latency is left out of that plot, not drawn at 0
    assert _points(plots["scatter-latency_ms"]) == {
        "teacher/big": ([2.0], [0.9]), "baseline": ([0.5], [0.6]), "student": ([0.5], [0.7])}
    assert "bar-test-metrics" not in plots  # the headline is the only test metric


def test_retrieval_plots_ndcg_recall_and_throughput(tmp_path):
    results = {
        "teacher": {"test/ndcg@10": 0.6, "test/recall@100": 0.9, "params": 22_000_000,
                    "passages_per_s": 100.0, "primary_metric": "ndcg@10"},
        "student": {"test/ndcg@10": 0.5, "test/recall@100": 0.8, "test/loss": 3.5, "params": 4_000_000,
                    "passages_per_s": 900.0, "teacher_passages_per_s": 100.0, "primary_metric": "ndcg@10"},
    }
    run = load_run(_write_run(tmp_path / "run", results))
    assert headline_key(run) == "test/ndcg@10"
    plots = {p.id: p for p in plan(run)}
    assert plots["bar-test-metrics"].groups == ["test/ndcg@10", "test/recall@100"]  # not the loss
    assert _points(plots["bar-test-metrics"])["student"] == (["test/ndcg@10", "test/recall@100"], [0.5, 0.8])
    assert _points(plots["bar-throughput"]) == {"teacher": (["passages_per_s"], [100.0]),
                                                "student": (["passages_per_s"], [900.0])}
    # no latency recorded: quality is traded off against throughput
    assert _points(plots["scatter-passages_per_s"]) == {"teacher": ([100.0], [0.6]),
                                                        "student": ([900.0], [0.5])}


def test_clip_and_graph_metric_names(tmp_path):
    clip = {s: {"test/zeroshot_acc": z, "test/i2t_r@1": r, "params": n, "latency_ms": 1.0,
                "primary_metric": "zeroshot_acc"}
            for s, z, r, n in (("teacher", 0.5, 0.4, 100), ("student", 0.3, 0.2, 10))}
    plots = _plots(_write_run(tmp_path / "clip", clip))
    assert plots["bar-test-metrics"].groups == ["zero-shot accuracy", "image->text recall@1"]
    graph = {s: {"test/acc": a, "test/acc_observed": o, "latency_full_ms": 3.0, "latency_inductive_ms": 1.0,
                 "params": 5, "primary_metric": "acc"}
             for s, a, o in (("teacher", 0.8, 0.85), ("baseline", 0.6, 0.65), ("student", 0.7, 0.75))}
    run = _write_run(tmp_path / "graph", graph, config="data:\n  setting: inductive\n")
    plots = _plots(run)
    assert plots["bar-test-metrics"].groups == ["test/acc (inductive)", "test/acc_observed (transductive)"]
    assert _points(plots["bar-latency"])["student"] == (
        ["latency_full_ms", "latency_inductive_ms"], [3.0, 1.0])
    assert {"scatter-latency_full_ms", "scatter-latency_inductive_ms"} <= set(plots)


def test_a_run_without_logs_or_config_still_renders(tmp_path):
    run = _write_run(tmp_path / "run", CLASSIFICATION, {"baseline": BASELINE_CSV})
    (run / "config.yaml").unlink()
    (run / "stages" / "student-gen2.json").unlink()
    page = render_report(run)
    assert "no logs/student/metrics.csv, so no learning curves" in page
    assert "no stages/student-gen2.json" in page
    assert "no config.yaml" in page
    assert "no environment.json in the run directory" in page
    assert "id='curve-train-loss'" in page and "id='scatter-params'" in page
    (run / "logs" / "student").mkdir()
    (run / "logs" / "student" / "metrics.csv").write_bytes(b"epoch,step\n\x00\x00")  # a killed writer's
    notes = html.unescape(render_report(run))
    assert "stage 'student': logs/student/metrics.csv has no train/ or val/ values" in notes
    bare = _write_run(tmp_path / "bare", {"student": {"params": 3}})  # no metric, no log at all
    path = write_report(bare)
    assert "no stage left a metrics.csv" in path.read_text()
    assert sorted(p.name for p in bare.iterdir()) == ["config.yaml", "report.html", "results.json", "stages"]


def test_results_table_shows_every_value(tmp_path):
    page = render_report(_write_run(tmp_path / "run", {
        "teacher": {"test/acc": 0.91234567, "params": 94186, "weaker_than_baseline": False,
                    "primary_metric": "acc", "test/loss": 12.345, "fit_seconds": 1234.56,
                    "test/latency_ms": 0.123456}}))
    # the same figures the console's and results.md's tables print (report.fmt), by what each key measures
    for text in ("0.9123", "title='0.91234567'", "94,186", ">no<", ">acc<", ">12.3450<", ">1,234.6<", ">0.123<"):
        assert text in page


def test_not_a_run_directory(tmp_path):
    with pytest.raises(KdkitError, match="not a kdkit run directory"):
        write_report(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(KdkitError, match="unreadable"):
        write_report(tmp_path)
