"""A benchmark killed outright (``kill -9``, a cluster's time limit) must not leave its worker
processes training on: they would hold the cores and write into the run folders a rerun resumes.
benchmarks._common.worker_pool's workers get SIGTERM when the benchmark dies (a kdkit run then
stops at its next batch and writes its checkpoint) and exit once their job has returned. Each
test SIGKILLs a real driver process."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")

DRIVER = textwrap.dedent("""
    import multiprocessing, os, sys, time
    from concurrent.futures import ProcessPoolExecutor
    sys.path.insert(0, {root!r})
    from benchmarks._common import worker_pool
    from tests.test_benchmark_workers import sleep_on, stop_on_sigterm
    pool = worker_pool(1) if {guarded} else ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    worker = pool.submit(os.getpid).result()
    job = stop_on_sigterm if {graceful} else sleep_on
    pool.submit(job, {tmp!r} + "/first")
    pool.submit(job, {tmp!r} + "/second")  # queued behind the first
    while not os.path.exists({tmp!r} + "/first.started"):  # the job is running in the worker
        time.sleep(0.05)
    print(worker, flush=True)
    time.sleep(120)
""")


def sleep_on(marker: str) -> None:
    """A job that does not handle SIGTERM (the default action ends the process)."""
    Path(marker + ".started").touch()
    time.sleep(120)


def stop_on_sigterm(marker: str) -> str:
    """A job that answers SIGTERM as a kdkit run does: finish the step, write a checkpoint, return."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    Path(marker + ".started").touch()
    while not stop.wait(0.05):
        pass
    Path(marker).write_text("checkpoint")
    return "stopped"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")  # a zombie (dead, not yet reaped) counts as gone
    return status.exists() and "zombie" not in status.read_text().lower()


def kill_driver(tmp_path, guarded: bool, graceful: bool) -> tuple[int, bool]:
    """Start a benchmark-like driver, SIGKILL it while its worker runs a job (no handler, no
    cleanup: what a time limit does), and say whether the worker is alive 10 s later."""
    code = DRIVER.format(root=str(ROOT), tmp=str(tmp_path), guarded=guarded, graceful=graceful)
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    worker = int(driver.stdout.readline())
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.monotonic() + 10
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    return worker, alive(worker)


def test_a_worker_dies_with_its_killed_benchmark(tmp_path):
    worker, survived = kill_driver(tmp_path, guarded=True, graceful=False)
    assert not survived, f"worker {worker} outlived its killed benchmark"


def test_a_job_that_stops_on_sigterm_saves_and_its_worker_exits(tmp_path):
    worker, survived = kill_driver(tmp_path, guarded=True, graceful=True)
    assert not survived, f"worker {worker} outlived its killed benchmark"
    assert (tmp_path / "first").read_text() == "checkpoint"  # stopped by SIGTERM, cleanly
    assert not (tmp_path / "second.started").exists()  # the job queued behind it never started


# A SIGKILLed process's threads do not die at once. prctl's SIGTERM comes when the thread that
# started the worker (the main one) exits; while another thread of the dying benchmark still
# runs, getppid() in the worker names the same process. This driver holds that window open for
# 4 s (its main thread exits through pthread_exit, a second thread ends the process later), so
# a queued job that started in it (as one did, rarely, under load) would start here every time.
DYING_SLOWLY = DRIVER.replace("time.sleep(120)\n", """\
import ctypes, threading
threading.Thread(target=lambda: (time.sleep(4), os._exit(0))).start()
ctypes.CDLL(None).pthread_exit(None)
""")
assert DYING_SLOWLY != DRIVER


def test_a_queued_job_does_not_start_while_the_benchmark_is_dying(tmp_path):
    code = DYING_SLOWLY.format(root=str(ROOT), tmp=str(tmp_path), guarded=True, graceful=True)
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    worker = int(driver.stdout.readline())
    try:
        assert driver.wait(timeout=60) == 0  # ended by its second thread, after the window
        deadline = time.monotonic() + 10
        while alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(worker)
    finally:  # a failing run must not leave a driver waiting on its worker's job forever
        driver.kill()
        if alive(worker):
            os.kill(worker, signal.SIGKILL)
    assert (tmp_path / "first").read_text() == "checkpoint"
    assert not (tmp_path / "second.started").exists()


def test_an_unguarded_pool_leaves_its_worker_running(tmp_path):
    """The control: the fault the guard is for is real (a plain spawn pool's worker survives)."""
    worker, survived = kill_driver(tmp_path, guarded=False, graceful=False)
    try:
        assert survived
    finally:
        if alive(worker):
            os.kill(worker, signal.SIGKILL)
