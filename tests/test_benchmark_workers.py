"""A benchmark killed outright (``kill -9``, a cluster's time limit) must not leave its worker
processes training on: they would hold the cores and write into the run directories a rerun
resumes. benchmarks._common.worker_pool's workers end with the process that started them."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")

DRIVER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    from benchmarks._common import worker_pool
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing
    pool = worker_pool(1) if {guarded} else ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn"))
    print(pool.submit(os.getpid).result(), flush=True)  # the one worker's pid
    pool.submit(time.sleep, 120)  # a long run in flight when the benchmark is killed
    time.sleep(120)
""")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (dead, not yet reaped by init) counts as gone
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text().lower()


def worker_after_parent_killed(guarded: bool) -> tuple[int, bool]:
    """Start a benchmark-like driver, SIGKILL it while its worker runs a job, and say whether the
    worker is still alive a few seconds later."""
    driver = subprocess.Popen([sys.executable, "-c", DRIVER.format(root=str(ROOT), guarded=guarded)],
                              stdout=subprocess.PIPE, text=True)
    worker = int(driver.stdout.readline())
    time.sleep(0.5)  # the sleep job has reached the worker
    driver.send_signal(signal.SIGKILL)  # no handler, no cleanup: what a time limit does
    driver.wait()
    deadline = time.monotonic() + 10
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    return worker, alive(worker)


def test_workers_end_with_a_killed_benchmark():
    worker, survived = worker_after_parent_killed(guarded=True)
    assert not survived, f"worker {worker} outlived its killed benchmark"


def test_an_unguarded_pool_leaves_its_worker_running():
    """The control: the fault the guard is for is real (a plain spawn pool's worker survives)."""
    worker, survived = worker_after_parent_killed(guarded=False)
    try:
        assert survived
    finally:
        if alive(worker):
            os.kill(worker, signal.SIGKILL)
