"""Fault injection: every case of ``tests/faults/cases.py``, run once, as one table.

The cases are exactly what ``tests/faults`` checks (the tests call the same functions): kill -9
mid-stage and during checkpoint writes, Ctrl-C and SIGTERM (SLURM pre-emption), DDP rank death,
damaged / empty / malicious files of every kind kdkit reads, and impossible config values. Each
row: the exit code, the one-line message kdkit printed, the data lost (a resumed run compared
with a straight run of the same overrides and seed) and the seconds the case took.

    python benchmarks/faults.py [--cases SUBSTRING,...] [--out benchmarks/results/faults.md]
                                [--workdir DIR] [--list] [--merge EARLIER_WORKDIR/outcomes.jsonl]

``--merge`` reruns only ``--cases`` (after a fix) and rewrites the table with the earlier full
run's other rows, naming that run in the header.

Run it alone (it starts training processes; DDP cases start two). Subprocesses use
``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("KDKIT_DATA_DIR", str(ROOT.parent / "shared" / "data"))
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from benchmarks._common import RESULTS, command, machine  # noqa: E402
from tests.faults.cases import (  # noqa: E402
    CASES,
    EXIT_LIMIT_S,
    KNOWN_BUGS,
    SLURM_GRACE_S,
    TOL,
    Ctx,
    Outcome,
    run_case,
)


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    return rev + (" + uncommitted changes" if git("status", "--porcelain") else "")


def cell(text: str, workdirs: dict[Path, str]) -> str:
    """A table cell: each work dir shortened to its name (``<work>``), pipes and backticks escaped."""
    text = str(text)
    for path, name in workdirs.items():
        text = text.replace(str(path), name)
    text = text.replace("\n", " ")
    return text.replace("|", "\\|").replace("`", "\\`")


def selected(filters: str | None) -> list:
    if not filters:
        return list(CASES)
    wanted = [f.strip().lower() for f in filters.split(",") if f.strip()]
    return [c for c in CASES if any(w in c.name.lower() or w == c.group.lower() for w in wanted)]


def earlier_run(outcomes_file: Path, table: Path) -> tuple[list[Outcome], list[str]]:
    """The outcomes of an earlier run (its work dir's ``outcomes.jsonl``) and the header lines
    (command, date, machine, commit) of the full run behind ``table``, for ``--merge``: its own
    header, or, when ``table`` was itself merged, the full run that header names."""
    rows = [json.loads(line) for line in outcomes_file.read_text().splitlines() if line.strip()]
    outcomes = [Outcome(**{k: v for k, v in row.items() if k in Outcome.__dataclass_fields__}) for row in rows]
    keys = ("- command:", "- date:", "- machine:", "- kdkit commit:")
    lines = table.read_text().splitlines() if table.exists() else []
    header = [line.strip() for line in lines if line.startswith(tuple("  " + k for k in keys))] or \
        [line for line in lines if line.startswith(keys)]
    return outcomes, header


def report(outcomes: list[Outcome], workdir: Path, seconds: float, rerun: list[str] | None = None,
           earlier: list[str] | None = None, earlier_dir: Path | None = None) -> str:
    passed = sum(o.ok for o in outcomes)
    dirs = {workdir: "<work>", **({earlier_dir: "<earlier work>"} if earlier_dir else {})}
    merged = []
    if rerun is not None:  # --merge: say which rows this command ran and where the others come from
        merged = [f"- rows measured by this command: {', '.join(rerun)}; every other row is from the "
                  f"earlier full run (`<earlier work>` = {earlier_dir}):", *(f"  {line}" for line in earlier or [])]
    lines = [
        "# Fault injection: kill -9, signals, DDP rank death, damaged files, bad config values",
        "",
        f"- command: `{command()}`",
        f"- date: {dt.datetime.now():%Y-%m-%d %H:%M}",
        f"- machine: {machine()}",
        f"- kdkit commit: {commit()}",
        *merged,
        f"- cases: {len(outcomes)}, {passed} pass every check, {len(outcomes) - passed} fail some "
        f"(listed below the table); {seconds / 60:.1f} min in all; `<work>` = {workdir}",
        "",
        "Each case is a function in `tests/faults/cases.py`; `tests/faults/test_*.py` assert the same "
        "checks (`pytest -m slow tests/faults`). Every fault is real: `os.kill(pid, SIGKILL)` on the "
        "training process once `checkpoints/<stage>/last.ckpt` (loaded with `weights_only=True`) "
        "shows the wanted epoch; SIGINT / SIGTERM to the process group of a run started in its own "
        "session (as a terminal or SLURM sends them; SIGKILL follows SIGTERM after "
        f"{SLURM_GRACE_S:.0f} s if anything is left), or `os.kill` of the run on itself at an exact "
        "epoch end (`tests/faults/signals.py`); a DDP rank found as rank 0's child process and "
        "SIGKILLed; damaged files are real bytes: truncated or 4 KB-inverted copies of real "
        "checkpoints and of the real data archives, empty files, random bytes, and a pickle whose "
        "`__reduce__` runs `os.system(\"touch <marker>\")` (the marker must never appear). The runs "
        "are the offline digits demo (`trainer.max_epochs=12 stages.baseline=false "
        "student.model.dropout=0.3` for kills and signals; DDP: 2 gloo processes, 6 epochs) and "
        "smoke runs of the real CIFAR-10, SciFact, Cora and CSV-pairs data.",
        "",
        "**Exit code**: of the faulted command, then of `ckpt_path=last` where the case resumes "
        "(`-9`: killed by the signal; `1`: Lightning's exit after Ctrl-C; `143`: SIGTERM). "
        "**Data lost**: a resumed run's `results.json` (every `test/*` and `val/*` value) and saved "
        f"weights (`teacher.pt`, `export/student.pt`) against a straight run of the same overrides "
        f"and seed (equal to {TOL:g}: none lost), and each epoch's validation row once in the "
        "resumed stages' `metrics.csv`; a resume from an epoch-end checkpoint must be exact, and so "
        "must one from the middle of an epoch written after a finished step (SIGTERM, step "
        "checkpoints: the epoch goes on at its next batch); Ctrl-C from outside lands inside a step, "
        "which trains again with other random draws, and its measured difference is shown. For a refused "
        "run: whether anything was written. **Seconds**: the whole case, including the one-time "
        "shared preparation (a straight run, a trained teacher, the decoded CIFAR-10 cache) of the "
        "first case that needs it.",
        "",
        "| case | exit code | the one-line message | data lost | seconds | checks |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        status = "pass" if o.ok else ("FAIL (known bug)" if o.case in KNOWN_BUGS else "FAIL")
        lines.append(f"| {cell(o.case, dirs)} | {cell(o.exit_code, dirs)} | "
                     f"{cell(o.message, dirs)} | {cell(o.data_lost, dirs)} | {o.seconds:.1f} | "
                     f"{status} |")
    failed = [o for o in outcomes if not o.ok]
    if failed:
        lines += ["", "## Failed checks", ""]
        for o in failed:
            known = f" *{KNOWN_BUGS[o.case][0]}*" if o.case in KNOWN_BUGS else ""
            lines.append(f"- **{cell(o.case, dirs)}**:{known} " +
                         "; ".join(cell(f, dirs) for f in o.failures))
    ddp = [o for o in outcomes if "exit_seconds" in o.values]
    if ddp:
        lines += ["", "## Time to exit", "",
                  f"Seconds from the fault until every process of the run had exited (limit: "
                  f"{EXIT_LIMIT_S:.0f} s after a rank's death, {SLURM_GRACE_S:.0f} s after SIGTERM):", ""]
        lines += [f"- {cell(o.case, dirs)}: {o.values['exit_seconds']:.1f} s" for o in ddp]
    notes = [(o, n) for o in outcomes for n in o.notes]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {cell(o.case, dirs)}: {cell(n, dirs)}" for o, n in notes]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", help="comma-separated substrings of case names (or group names: "
                                        "config, kill, signal, ddp, data, ...); default: all")
    parser.add_argument("--out", default=str(RESULTS / "faults.md"), help="the markdown table")
    parser.add_argument("--workdir", help="scratch directory (default: a new temporary one, kept)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--merge", help="an earlier run's outcomes.jsonl (in its work dir): rerun only the "
                                        "--cases and write the table with that run's other rows")
    args = parser.parse_args()
    cases = selected(args.cases)
    if args.list:
        for case in cases:
            print(f"{case.group:20s} {case.name}  ({case.what})")
        return
    if not cases:
        parser.error(f"no case matches --cases={args.cases}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kdkit-faults-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"{len(cases)} cases; work dir {workdir}", flush=True)
    outcomes = []
    start = time.monotonic()
    with open(workdir / "outcomes.jsonl", "a") as log:
        for i, case in enumerate(cases, 1):
            print(f"[{i}/{len(cases)}] {case.name} ...", flush=True)
            slug = "".join(c if c.isalnum() else "-" for c in case.name).strip("-")
            ctx = Ctx(workdir / "cases" / f"{i:02d}-{slug}", workdir / "shared",
                      log=lambda line: print(line, flush=True))
            out = run_case(case, ctx)
            outcomes.append(out)
            log.write(json.dumps(out.__dict__, default=str) + "\n")
            log.flush()
            verdict = "pass" if out.ok else "FAIL: " + "; ".join(out.failures)
            print(f"    exit {out.exit_code} | {out.data_lost} | {out.seconds:.1f} s | {verdict}", flush=True)
    seconds = time.monotonic() - start
    if args.merge:
        earlier, header = earlier_run(Path(args.merge), Path(args.out))
        fresh = {o.case: o for o in outcomes}
        merged = [fresh.pop(o.case, o) for o in earlier] + list(fresh.values())
        seconds += sum(o.seconds for o in merged if o.case not in {c.name for c in cases})
        text = report(merged, workdir, seconds, rerun=[c.name for c in cases], earlier=header,
                      earlier_dir=Path(args.merge).resolve().parent)
        outcomes = merged
    else:
        text = report(outcomes, workdir, seconds)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    print(f"wrote {out_path}: {sum(o.ok for o in outcomes)}/{len(outcomes)} cases pass")


if __name__ == "__main__":
    main()
