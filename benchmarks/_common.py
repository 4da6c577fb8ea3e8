"""Shared pieces of the benchmark scripts: machine facts, mean ± std, markdown writing, and
resumable runs of kdkit students in parallel one-thread workers."""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """Host, cores, CPU model and the instruction set torch's kernels use (AVX2 and AVX-512
    machines round differently, so one command's numbers differ between them), GPU, versions."""
    import torch

    from kdkit.run_environment import cpu_model

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.node()}: {os.cpu_count()} cores ({cpu_model()}, "
            f"{torch.backends.cpu.get_cpu_capability()}), {gpu}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads; Python {platform.python_version()}")


def cpu_of(row: dict) -> str:
    """``", on <CPU model>"`` from a row's recorded machine (restored rows name it in their note)."""
    m = row.get("machine", "")
    return f", on {m.split('(', 1)[1].split(')', 1)[0]}" if "(" in m else ""


def command() -> str:
    return " ".join(["python", *sys.argv])


def header(title: str) -> str:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).parent).stdout.strip() or "unknown"
    return (f"# {title}\n\n- command: `{command()}`\n- date: {dt.datetime.now():%Y-%m-%d %H:%M}\n"
            f"- machine: {machine()}\n- kdkit commit: {rev}\n")


def mean_std(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "-"
    m = statistics.mean(values) * scale
    if len(values) == 1:
        return f"{m:.2f}"
    return f"{m:.2f} ± {statistics.stdev(values) * scale:.2f}"


RUNS = Path(__file__).resolve().parent / "runs"
RAW = RESULTS / "raw"


def archive_of(path: Path) -> Path | None:
    """Where a run log under ``benchmarks/runs/`` keeps its committed copy:
    ``benchmarks/results/raw/<its folder, "/" as "__">.jsonl``; None for a log elsewhere (a test's
    temporary folder, a reproduction that wants its own runs: ``--out`` outside ``benchmarks/runs``)."""
    try:
        rel = Path(path).resolve().parent.relative_to(RUNS)
    except ValueError:
        return None
    return RAW / f"{'__'.join(rel.parts) or 'runs'}.jsonl"


class RunLog:
    """Finished benchmark runs, one JSON line each in ``path``, so an interrupted benchmark
    resumes where it stopped. ``done`` maps ``key(row)`` to the row (a later line wins).

    ``benchmarks/runs/`` is not committed and goes with its machine, and a results file is
    rewritten from its log: a partial rerun on a fresh machine would drop every row measured
    before. So a log under ``benchmarks/runs/`` also appends each row to a committed copy
    (``archive_of``), and reads that copy first: its rows count as done (delete a row there, or
    pass an ``--out`` elsewhere, to run it again)."""

    def __init__(self, path: Path, key, archive: Path | None | bool = True):
        self.path, self.key = Path(path), key
        self.archive = archive_of(self.path) if archive is True else (archive or None)
        archived = self._read(self.archive)
        local = self._read(self.path)
        self.done = {**archived, **local}
        missing = [row for k, row in local.items() if k not in archived]
        if self.archive is not None and missing:  # a log from before the copy existed
            self._append(self.archive, missing)

    def _read(self, path: Path | None) -> dict:
        rows = {}
        if path is not None and path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    rows[self.key(row)] = row
        return rows

    @staticmethod
    def _append(path: Path, rows: list[dict]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)

    def record(self, row: dict) -> dict:
        self.done[self.key(row)] = row
        for target in (self.path, self.archive):
            if target is not None:
                self._append(target, [row])
        return row


def raw_rows(out: str | Path) -> str:
    """The report sentence naming a run folder's raw log and, for one under ``benchmarks/runs/``,
    its committed copy (the local log goes with its machine)."""
    log = Path(out) / "log.jsonl"
    copy = archive_of(log)
    root = RESULTS.parent.parent
    shown = copy.relative_to(root) if copy and copy.is_relative_to(root) else copy
    kept = f" (committed copy: `{shown}`)" if copy else ""
    return f"Raw rows: `{log}`{kept}."


def restored_note(rows, commands: bool = False) -> list[str]:
    """Report lines naming where rows marked ``restored_from`` came from (rows re-entered from a
    committed results file after their raw log was lost), and with ``commands`` the commands that
    measured them (``source_commands``), with a blank line after; none if none."""
    rows = [r for r in rows if r.get("restored_from")]
    lines = [f"Rows {s}." for s in sorted({r["restored_from"] for r in rows})]
    if commands:
        ran = dict.fromkeys(c for r in rows for c in r.get("source_commands", []))
        lines += ["Their commands: " + "; ".join(f"`{c}`" for c in ran) + "."] if ran else []
    return lines + ([""] if lines else [])


def write(name: str, text: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(text)
    print(f"wrote {path}")
    return path


def run_student(job: tuple) -> dict:
    """One run of ``job`` = (method, seed, overrides, output_dir, threads): the metrics of the
    stage the row trains (``row_stage``), with ``wall_s``. Runs with
    ``ckpt_path=last``, so a run interrupted in an earlier session (a killed benchmark) continues
    from its last epoch's checkpoint instead of from scratch. Top level, so that spawned workers
    can import it."""
    import torch

    from kdkit.compose import compose
    from kdkit.pipeline import run

    method, seed, over, output_dir, threads = job
    torch.set_num_threads(threads)
    start = time.time()
    res = run(compose([*over, "ckpt_path=last"], output_dir=output_dir))
    stage = row_stage(res)
    return {"method": method, "seed": seed, **res[stage], "wall_s": round(time.time() - start, 1),
            "train_loss_by_epoch": epoch_means(Path(output_dir) / "logs" / stage / "metrics.csv"),
            "machine": machine()}  # read here: the thread count the run had, not its driver's


def row_stage(results: dict) -> str:
    """The stage a benchmark row measures, from a run's results: its distilled student, or for a
    row that trains none (``stages.student=false``: the baselines, whatever their row is named)
    its baseline."""
    if "student" in results:
        return "student"
    if "baseline" in results:
        return "baseline"
    raise KeyError(f"a benchmark row trains a student or a baseline; this run has only {sorted(results)}")


def epoch_means(metrics_csv: Path, column: str = "train/loss") -> list[float]:
    """The mean of ``column`` over each epoch's logged steps, in epoch order (how far a run is
    from its floor); empty when the file or the column is missing."""
    from kdkit.report_data import read_curves

    curve = read_curves(metrics_csv, "").get(column) if Path(metrics_csv).exists() else None
    by_epoch: dict[int, list[float]] = {}
    for epoch, y in zip(curve.epoch, curve.y) if curve else ():
        if epoch is not None:
            by_epoch.setdefault(int(epoch), []).append(y)
    return [round(statistics.mean(by_epoch[e]), 4) for e in sorted(by_epoch)]


_in_job = False  # in a worker: whether a job is running (the orphan watchdog waits for it)
_parent: int | None = None  # in a worker: the pid of the process that started it


def die_with_parent() -> None:
    """Worker initializer: a worker ends with the process that started it. A benchmark killed by
    ``kill -9`` or a cluster's time limit would otherwise leave its workers training on: they
    hold the cores, and a rerun of the same command resumes the same run folders while the
    orphans still write into them.

    The kernel sends the worker SIGTERM when its parent dies (``prctl``, Linux), which a kdkit
    run answers by stopping at the next batch and writing its checkpoint; a watchdog thread then
    ends the process once no job is running (the pool's loop would wait forever for a next one)."""
    import ctypes
    import signal
    import threading

    global _parent
    _parent = os.getppid()
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    threading.Thread(target=_exit_when_orphaned, daemon=True, name="orphan-watchdog").start()


_HAS_PROC = Path("/proc/self/stat").exists()  # Linux; elsewhere getppid() alone decides


def _orphaned() -> bool:
    """Whether the process that started this worker is gone or dying.

    ``getppid()`` alone is not enough: ``prctl``'s SIGTERM comes when the *thread* that started
    the worker exits, and while the dying benchmark's other threads (the pool's manager) still
    run, the worker is handed to one of them, so ``getppid()`` names the same process. In that
    window a job queued in the pipe would start; the benchmark's main thread, a zombie by then,
    tells (``tests/test_benchmark_workers.py`` holds the window open)."""
    if _parent is None:
        return False
    if os.getppid() != _parent:
        return True
    return _HAS_PROC and _process_state(_parent) in {None, "Z", "X"}


def _process_state(pid: int) -> str | None:
    """The state letter of ``pid``'s main thread (``/proc/<pid>/stat``), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]  # the command name in parentheses may hold spaces


def _exit_when_orphaned(poll_s: float = 0.5) -> None:
    while not _orphaned():
        time.sleep(poll_s)
    while _in_job:  # the job got SIGTERM: let it write its checkpoint and return
        time.sleep(poll_s)
    os._exit(1)


def _job(fn, *args, **kwargs):
    """Runs one pool job, marked as running for the orphan watchdog."""
    global _in_job
    if _orphaned():
        os._exit(1)  # a job still queued in the pipe when the benchmark died: not started (see the test)
    _in_job = True
    try:
        return fn(*args, **kwargs)
    finally:
        _in_job = False


class OrphanSafePool(ProcessPoolExecutor):
    """A spawn-context process pool whose workers end with the process that started them
    (``die_with_parent``; each job marked running through ``_job``)."""

    def __init__(self, n_jobs: int):
        super().__init__(n_jobs, mp_context=multiprocessing.get_context("spawn"), initializer=die_with_parent)

    def submit(self, fn, /, *args, **kwargs):
        return super().submit(_job, fn, *args, **kwargs)


def worker_pool(n_jobs: int) -> OrphanSafePool:
    """``n_jobs`` spawned worker processes that end with the process that started them."""
    return OrphanSafePool(n_jobs)


def run_all_jobs(jobs: list[tuple], n_jobs: int, threads: int, failed: list[str] | None = None):
    """Rows of the ``(method, seed, overrides, output_dir)`` jobs, yielded as each finishes (so
    an interrupted benchmark can record them and resume): in this process with ``threads``
    torch threads when ``n_jobs`` is 1, else in ``n_jobs`` spawned workers of one thread each.

    A failing run is said at once and the others go on; the failures are raised together at the
    end, or, given a ``failed`` list, appended to it (a benchmark with later phases runs them
    first and raises after its report)."""
    from concurrent.futures import as_completed

    jobs = [(*job, 1 if n_jobs > 1 else threads) for job in jobs]
    raise_at_end = failed is None
    failed = [] if failed is None else failed

    def failure(job: tuple, err: BaseException) -> None:
        # one failing run (e.g. a resume refused) must not hold back the others' rows: they are
        # yielded as they finish, the failures are said at once and raised together at the end
        failed.append(f"{job[0]} seed {job[1]} ({job[3]}): {type(err).__name__}: {err}")
        print(f"[benchmark] run failed: {failed[-1]}", file=sys.stderr, flush=True)

    if n_jobs <= 1:
        for job in jobs:
            try:
                row = run_student(job)
            except Exception as err:  # noqa: BLE001 - reported, and raised after the other jobs
                failure(job, err)
                continue
            yield row
    else:
        with worker_pool(n_jobs) as pool:
            futures = {pool.submit(run_student, job): job for job in jobs}
            for future in as_completed(futures):
                try:
                    row = future.result()
                except Exception as err:  # noqa: BLE001 - as above
                    failure(futures[future], err)
                    continue
                yield row
    if raise_at_end and failed:
        raise_failures(failed, len(jobs))


def raise_failures(failed: list[str], total: int | None = None) -> None:
    """One error naming every failed run (``failed``: what ``run_all_jobs`` collected)."""
    if failed:
        counted = f"{len(failed)} of {total} runs" if total is not None else \
            f"{len(failed)} run{'s' if len(failed) > 1 else ''}"
        raise RuntimeError(f"{counted} failed (the others are recorded):\n  " + "\n  ".join(failed))


PAIRED_DELTA_NOTE = ("Δ vs baseline: the row's mean minus the baseline's mean over the same seeds (a seed fixes "
                     "the student's init and data order), or over all of the baseline's seeds where it lacks one.")


def paired_delta(rows: list[dict], baseline: dict[int, float]) -> float:
    """The rows' mean test accuracy minus the baseline's over the same seeds (``baseline``: seed ->
    accuracy), so a row run at seed 0 only is compared with the baseline's seed 0, not with a mean
    that includes seeds the row never ran; over all of the baseline's seeds where one is missing
    (NaN without a baseline)."""
    seeds = [r["seed"] for r in rows]
    paired = [baseline[s] for s in seeds if s in baseline]
    reference = paired if len(paired) == len(seeds) else list(baseline.values())
    if not reference:
        return float("nan")
    return statistics.mean(r["test/acc"] for r in rows) - statistics.mean(reference)
