"""Run every test file alone, each in its own pytest process, and report those that fail alone.

A file can pass in the full suite only because an earlier file imported or configured something
for it (a test-order dependency). This runs ``pytest -q -x <file>`` once per file, one after the
other, and exits 1 if any file fails on its own.

    python tests/run_each_file.py                        # every tests/**/test_*.py
    python tests/run_each_file.py tests/test_cli.py ...  # just these files
    python tests/run_each_file.py --timeout 600 -- -m slow   # extra pytest arguments after --
    python tests/run_each_file.py --jobs 2               # two files at a time (tests use 1 thread)

Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import argparse
import subprocess
from concurrent.futures import ThreadPoolExecutor
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_TESTS_COLLECTED = 5  # pytest's exit code when the markers deselect a whole file
# Files that cannot depend on test order by construction, left out of the default list: every
# check in them runs its commands in a fresh subprocess and directory (~5 min each time).
ALONE_BY_CONSTRUCTION = {"tests/test_readme_commands.py"}


def test_files(paths: list[str]) -> list[Path]:
    """The given files, or every ``test_*.py`` under tests/ (sorted), as paths from the root."""
    if paths:
        return [Path(p).resolve().relative_to(ROOT) for p in paths]
    return sorted(p.relative_to(ROOT) for p in (ROOT / "tests").rglob("test_*.py")
                  if str(p.relative_to(ROOT)) not in ALONE_BY_CONSTRUCTION)


def run_alone(path: Path, pytest_args: list[str], timeout: float) -> tuple[str, str]:
    """("pass" | "fail" | "empty", a summary) for ``pytest -q -x path`` in a new process; a
    failure's summary adds pytest's ``E`` lines, so that a failure seen only here (a flake under
    load) can be diagnosed from the CI log."""
    start = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "-q", "-x", str(path), *pytest_args]
    try:
        out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "fail", f"timed out after {timeout:g} s"
    seconds = time.perf_counter() - start
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    last = lines[-1].strip("= ") if lines else "no output"
    if out.returncode == 0:
        return "pass", f"{last} ({seconds:.1f} s)"
    if out.returncode == NO_TESTS_COLLECTED:
        return "empty", f"no tests selected ({seconds:.1f} s)"
    detail = "".join(f"\n        {line}" for line in [x for x in lines if x.startswith("E ")][:20])
    return "fail", f"exit {out.returncode}: {_first_failure(lines) or last} ({seconds:.1f} s){detail}"


def _first_failure(lines: list[str]) -> str | None:
    """pytest's first 'FAILED ...'/'ERROR ...' summary line, the most useful one to show."""
    return next((line for line in lines if line.startswith(("FAILED ", "ERROR "))), None)


def main(argv: list[str] | None = None) -> int:
    """Run each file alone; print one line per file and the list of failures; 1 if any."""
    argv = sys.argv[1:] if argv is None else argv
    pytest_args = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="test files (default: every tests/**/test_*.py)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per file (default 1800)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="files run at the same time (default 1); the suite's tests use one torch thread each")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)

    failed = []
    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        files = test_files(args.files)
        for path, (status, summary) in zip(files, pool.map(lambda p: run_alone(p, pytest_args, args.timeout), files)):
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
