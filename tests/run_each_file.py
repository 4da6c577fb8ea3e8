"""Run every test file alone, each in its own pytest process, and report those that fail alone.

A file can pass in the full suite only because an earlier file imported or configured something
for it (a test-order dependency). This runs ``pytest -q -x <file>`` once per file, in a process of
its own, and exits 1 if any file fails on its own.

    python tests/run_each_file.py                        # every tests/**/test_*.py
    python tests/run_each_file.py tests/test_cli.py ...  # just these files
    python tests/run_each_file.py --timeout 600 -- -m slow   # extra pytest arguments after --
    python tests/run_each_file.py --jobs 2               # two files at a time (tests use 1 thread)

Each file's process is forked from this one after it has imported the heavy third-party
libraries (``PRELOAD``: torch and lightning alone take ~7 s to import on 2 cores, more than most
files take to run). Nothing of kdkit or of the tests is imported before the fork, so what a file
could inherit from another file is still nothing: a file that passes here passes on its own.
``--no-preload`` (and platforms without ``fork``) start each file as a new interpreter instead.

Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_TESTS_COLLECTED = 5  # pytest's exit code when the markers deselect a whole file
# Files that cannot depend on test order by construction, left out of the default list: every
# check in them runs its commands in a fresh subprocess and directory (~5 min each time).
ALONE_BY_CONSTRUCTION = {"tests/test_readme_commands.py"}
# third-party only: importing them has no effect on what a test can see besides sys.modules
PRELOAD = ("numpy", "torch", "torchvision", "lightning", "timm", "transformers", "hydra", "omegaconf")


def test_files(paths: list[str]) -> list[Path]:
    """The given files, or every ``test_*.py`` under tests/ (sorted), as paths from the root."""
    if paths:
        return [Path(p).resolve().relative_to(ROOT) for p in paths]
    return sorted(p.relative_to(ROOT) for p in (ROOT / "tests").rglob("test_*.py")
                  if str(p.relative_to(ROOT)) not in ALONE_BY_CONSTRUCTION)


class Run:
    """One file's pytest process (forked, or a new interpreter), its output in a temporary file."""

    def __init__(self, path: Path, pytest_args: list[str], fork: bool):
        self.path, self.start = path, time.perf_counter()
        self.log = tempfile.TemporaryFile(mode="w+")
        args = ["-q", "-x", str(path), *pytest_args]
        if fork:
            self.pid, self.proc = os.fork(), None
            if self.pid == 0:  # the child: never returns
                _run_pytest_here(args, self.log)
        else:
            self.proc = subprocess.Popen([sys.executable, "-m", "pytest", *args], cwd=ROOT, stdout=self.log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
            self.pid = self.proc.pid

    def poll(self) -> int | None:
        """The exit code once the process has ended, else None."""
        if self.proc is not None:
            return self.proc.poll()
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        return None if pid == 0 else os.waitstatus_to_exitcode(status)

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)  # the file's own subprocesses too
        except ProcessLookupError:
            pass
        if self.proc is not None:
            self.proc.wait()
        else:
            os.waitpid(self.pid, 0)

    def result(self, code: int | None) -> tuple[str, str]:
        """("pass" | "fail" | "empty", a summary); None: timed out. A failure's summary adds
        pytest's ``E`` lines, so that a failure seen only here (a flake under load) can be
        diagnosed from the CI log."""
        seconds = time.perf_counter() - self.start
        self.log.seek(0)
        lines = [line for line in self.log.read().splitlines() if line.strip()]
        self.log.close()
        if code is None:
            return "fail", f"timed out after {seconds:.0f} s"
        last = lines[-1].strip("= ") if lines else "no output"
        if code == 0:
            return "pass", f"{last} ({seconds:.1f} s)"
        if code == NO_TESTS_COLLECTED:
            return "empty", f"no tests selected ({seconds:.1f} s)"
        detail = "".join(f"\n        {line}" for line in [x for x in lines if x.startswith("E ")][:20])
        return "fail", f"exit {code}: {_first_failure(lines) or last} ({seconds:.1f} s){detail}"


def _run_pytest_here(args: list[str], log) -> None:
    """In a forked child: pytest on ``args`` with stdout/stderr into ``log``, then exit with its code."""
    code = 1
    try:
        os.setpgrp()  # a process group of its own, so a timeout kills what the file started
        os.chdir(ROOT)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        # fresh streams on fds 1 and 2: the parent's may be wrapped (a parent under pytest captures them)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        import pytest

        code = int(pytest.main(args))
    except BaseException as err:  # noqa: BLE001 - anything raised here is the file's failure
        print(f"E   {type(err).__name__}: {err}", file=sys.stderr)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _first_failure(lines: list[str]) -> str | None:
    """pytest's first 'FAILED ...'/'ERROR ...' summary line, the most useful one to show."""
    return next((line for line in lines if line.startswith(("FAILED ", "ERROR "))), None)


def run_all(files: list[Path], pytest_args: list[str], jobs: int, timeout: float, fork: bool):
    """``(path, status, summary)`` per file in ``files``' order, ``jobs`` processes at a time."""
    pending, running, done = list(files), [], {}
    while pending or running:
        while pending and len(running) < max(jobs, 1):
            running.append(Run(pending.pop(0), pytest_args, fork))
        time.sleep(0.05)
        for run in list(running):
            code = run.poll()
            if code is None and time.perf_counter() - run.start > timeout:
                run.kill()
            elif code is None:
                continue
            running.remove(run)
            done[run.path] = run.result(code)
        yield from _in_order(files, done)


def _in_order(files: list[Path], done: dict):
    """Pop and yield the finished files that come next in ``files``' order."""
    while files and files[0] in done:
        path = files.pop(0)
        yield (path, *done.pop(path))


def main(argv: list[str] | None = None) -> int:
    """Run each file alone; print one line per file and the list of failures; 1 if any."""
    argv = sys.argv[1:] if argv is None else argv
    pytest_args = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="test files (default: every tests/**/test_*.py)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per file (default 1800)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="files run at the same time (default 1); the suite's tests use one torch thread each")
    parser.add_argument("--no-preload", action="store_true",
                        help="start every file as a new interpreter instead of forking a preloaded one")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)

    fork = hasattr(os, "fork") and not args.no_preload
    if fork:
        for name in PRELOAD:
            importlib.import_module(name)
    failed = []
    order = test_files(args.files)
    for path, status, summary in run_all(list(order), pytest_args, args.jobs, args.timeout, fork):
        print(f"{status.upper():5} {path}  {summary}", flush=True)
        if status == "fail":
            failed.append(str(path))
    if failed:
        print(f"{len(failed)} file(s) fail when run alone: {', '.join(failed)}")
        return 1
    print("every file passes alone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
