"""Fault-injection cases, as data and small functions, shared by the tests and the benchmark.

Each case sets itself up in a scratch directory, runs kdkit (``python -m kdkit.train`` in a
subprocess, or in this process for the fast tests), injects a real fault and checks what came
out. ``tests/faults/test_*.py`` assert that a case has no failed checks (plus the key values);
``benchmarks/faults.py`` runs every case and tabulates the same outcome, so the benchmark
measures exactly what the tests check.

Every fault is real:

- kill -9 is ``os.kill(pid, SIGKILL)`` on the training process, sent once the run directory
  shows the wanted point (a checkpoint of a given epoch, loaded with ``weights_only=True``);
- SIGINT / SIGTERM go to the process group of a run started with ``start_new_session=True``,
  as a terminal's Ctrl-C or SLURM's pre-emption deliver them (SLURM: SIGTERM, then SIGKILL
  after a grace period), or from inside the run at an exact epoch end
  (``tests.faults.signals.SignalAtEpochEnd``, ``os.kill`` on itself);
- a DDP rank is killed with SIGKILL: rank 1 is found as rank 0's child process;
- damaged files are real bytes on disk: truncated or byte-flipped copies of real checkpoints and
  of the real data archives, empty files, random garbage, and a malicious pickle whose
  ``__reduce__`` runs ``os.system("touch <marker>")`` (the marker must never appear).

"Data lost" for a kill / resume case compares the resumed run's final ``results.json`` (every
``test/*`` and ``val/*`` value) with a straight run of the same overrides and seed, and checks
that the resumed stages' ``metrics.csv`` hold each epoch's validation row exactly once. A resume
from an epoch-end checkpoint must be exact (to 1e-6), and so must one from the middle of an
epoch written after a finished step (SIGTERM, step checkpoints): the resumed epoch goes on at its
next batch. Ctrl-C from outside lands inside a step (its random draws already spent), so that
resume trains the step again with other draws and is reported with its measured difference.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("KDKIT_DATA_DIR") or ROOT.parent / "shared" / "data")

TOL = 1e-6  # "equal" metrics of a resumed and a straight run
EXIT_LIMIT_S = 60.0  # every process of a DDP job must be gone this long after a rank died
SLURM_GRACE_S = 30.0  # SLURM's default KillWait: SIGKILL follows SIGTERM after this long

# Digits demo, small: the teacher and the student stage (the baseline adds nothing here).
QUICK = ["trainer.enable_progress_bar=false", "report.latency_batch_size=8", "stages.baseline=false"]
SHORT = [*QUICK, "trainer.max_epochs=2"]  # config / file cases: they stop before or at epoch 1
# Kill / resume cases: long enough to be caught mid-stage (16 steps per epoch); student dropout
# so the random state must travel with the checkpoint too.
LONG = [*QUICK, "trainer.max_epochs=12", "student.model.dropout=0.3"]
# CIFAR-10 / CLIP / retrieval / graph smoke runs: a couple of batches.
SMOKE = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
         "trainer.limit_test_batches=2", "trainer.enable_progress_bar=false",
         "report.latency_batch_size=8", "stages.baseline=false"]
DDP = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", *QUICK, "trainer.max_epochs=6"]

BASE_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline",
            "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "PL_DISABLE_FORK": "1", "PYTHONUNBUFFERED": "1"}


class CaseError(Exception):
    """The fault could not be injected as planned (the run ended first, a timeout, ...)."""


# ---- what a case returns -------------------------------------------------------------------------
@dataclass
class Outcome:
    """What one case measured. ``failures`` lists the checks that failed (empty: it passed)."""

    case: str
    exit_code: str = ""  # e.g. "2", "-9 (killed) -> 0 (resume)"
    message: str = ""  # the one-line kdkit message(s) of the fault run (and of the resume)
    data_lost: str = ""  # "none", or what was lost / differs
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    values: dict = field(default_factory=dict)  # measured numbers the tests assert on

    @property
    def ok(self) -> bool:
        return not self.failures

    def check(self, condition: bool, failure: str) -> bool:
        if not condition:
            self.failures.append(failure)
        return bool(condition)


@dataclass
class Ctx:
    """Where a case runs.

    Args:
        dir: the case's own fresh scratch directory.
        shared: a directory reused across cases (straight runs, a trained teacher, decoded data).
        inproc: run kdkit in this process (``compose`` + ``run_or_explain``) instead of
            ``python -m kdkit.train``; only for cases that need no signal or CLI parsing.
        log: progress lines.
    """

    dir: Path
    shared: Path
    inproc: bool = False
    log: Callable[[str], None] = lambda line: None


@dataclass
class Case:
    name: str
    group: str
    what: str  # one line: the fault
    fn: Callable[[Ctx], Outcome]
    inproc: bool = False  # may also run in-process (a fast test)
    slow: bool = True  # in-process runs of an ``inproc`` case are fast; subprocess ones are slow


# ---- running kdkit -------------------------------------------------------------------------------
@dataclass
class Result:
    rc: int | None  # None: killed by the harness after a timeout
    stdout: str
    stderr: str
    seconds: float

    @property
    def kdkit_lines(self) -> list[str]:
        return [line.strip() for line in self.stderr.splitlines() if line.strip().startswith("kdkit:")]

    @property
    def errors(self) -> list[str]:
        return [line for line in self.kdkit_lines if line.startswith("kdkit: error:")]


def env_for(extra: dict | None = None) -> dict:
    env = {**os.environ, **BASE_ENV, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.setdefault("KDKIT_DATA_DIR", str(SHARED_DATA))
    return env


def command(run_dir: Path, overrides: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "kdkit.train", f"hydra.run.dir={run_dir}", *overrides]


def _ctrl_c_as_in_a_terminal() -> None:
    """In the child before it runs: SIGINT back to its default action. A suite started in the
    background of a non-interactive shell (``cmd &``, as a CI script or a batch job may) has SIGINT
    ignored, its children inherit that, Python then installs no KeyboardInterrupt handler, and
    the Ctrl-C cases would see a run that simply goes on: a harness artefact, not kdkit's."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Running:
    """A ``python -m kdkit.train`` started in its own session (process group = its pid)."""

    def __init__(self, ctx: Ctx, run_dir: Path, overrides: Sequence[str], env: dict | None = None,
                 label: str = "run"):
        logs = ctx.dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        n = len(list(logs.glob("*.err")))
        self.out_path, self.err_path = logs / f"{n:02d}-{label}.out", logs / f"{n:02d}-{label}.err"
        self.cmd = command(run_dir, overrides)
        (logs / f"{n:02d}-{label}.cmd").write_text(" ".join(self.cmd) + "\n")
        self._out, self._err = open(self.out_path, "wb"), open(self.err_path, "wb")
        self.start = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=env_for(env), stdout=self._out,
                                     stderr=self._err, start_new_session=True,
                                     preexec_fn=_ctrl_c_as_in_a_terminal)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)

    def wait(self, timeout: float = 900) -> Result:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal_group(signal.SIGKILL)
            self.proc.wait()
            rc = None
        seconds = time.monotonic() - self.start
        kill_group_leftovers(self.pid)
        self._out.close(), self._err.close()
        return Result(rc, self.out_path.read_text(errors="replace"),
                      self.err_path.read_text(errors="replace"), seconds)


@contextlib.contextmanager
def patched_env(extra: dict) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update({k: str(v) for k, v in extra.items()})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_inproc(run_dir: Path, overrides: Sequence[str], env: dict | None = None) -> Result:
    """``kdkit-train`` in this process: ``compose`` + ``run_or_explain`` (as tests/test_cli.py)."""
    import traceback

    from kdkit.compose import compose
    from kdkit.train import run_or_explain

    err, out = io.StringIO(), io.StringIO()
    start = time.monotonic()
    rc = 0
    with patched_env(env or {}), contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            run_or_explain(compose(list(overrides), output_dir=str(run_dir)))
        except SystemExit as exit_:
            rc = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # noqa: BLE001 - a traceback is an outcome to report
            err.write(traceback.format_exc())
            rc = 1
    return Result(rc, out.getvalue(), err.getvalue(), time.monotonic() - start)


def run_kdkit(ctx: Ctx, run_dir: Path, overrides: Sequence[str], env: dict | None = None,
              label: str = "run", timeout: float = 900) -> Result:
    if ctx.inproc:
        return run_inproc(run_dir, overrides, env)
    return Running(ctx, run_dir, overrides, env, label).wait(timeout)


# ---- processes ----------------------------------------------------------------------------------
def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgrp) of a process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1]), int(fields[2])


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None and st[2] == pgid and st[0] not in "ZX":
                found.append(int(entry.name))
    return found


def children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            kids += [int(p) for p in (task / "children").read_text().split()]
    return kids


def kill_group_leftovers(pgid: int) -> None:
    """SIGKILL what is left of a run's process group (orphaned ranks), so nothing leaks."""
    if group_members(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


# ---- the run directory --------------------------------------------------------------------------
_LOADED: dict[Path, tuple[tuple, tuple[int, int] | None]] = {}


def ckpt_point(path: Path) -> tuple[int, int] | None:
    """``(epoch, global_step)`` of a checkpoint, loaded with ``weights_only=True``; None when it
    does not exist or does not load."""
    import torch

    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    key = (st.st_ino, st.st_mtime_ns, st.st_size)
    cached = _LOADED.get(path)
    if cached and cached[0] == key:
        return cached[1]
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        point = (int(ck["epoch"]), int(ck["global_step"]))
    except Exception:  # noqa: BLE001 - a file being replaced, or a damaged one
        point = None
    _LOADED[path] = (key, point)
    return point


def wait_until(running: Running, ready: Callable[[], bool], what: str, timeout: float = 300,
               poll: float = 0.01) -> float:
    """Poll ``ready`` until true; the seconds it took. CaseError if the run ended first."""
    start = time.monotonic()
    while not ready():
        if not running.alive():
            raise CaseError(f"the run exited (code {running.proc.returncode}) before {what}")
        if time.monotonic() - start > timeout:
            raise CaseError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)
    return time.monotonic() - start


def wait_for_epoch(running: Running, run_dir: Path, stage: str, epoch: int, timeout: float = 300) -> None:
    last = run_dir / "checkpoints" / stage / "last.ckpt"
    wait_until(running, lambda: (ckpt_point(last) or (-1, 0))[0] >= epoch,
               f"checkpoints/{stage}/last.ckpt reached epoch {epoch}", timeout)


def results_of(run_dir: Path) -> dict | None:
    path = run_dir / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def eval_metrics(results: dict) -> dict[str, dict[str, float]]:
    return {stage: {k: v for k, v in m.items() if k.startswith(("test/", "val/"))}
            for stage, m in results.items()}


def metric_diff(a: dict, b: dict) -> tuple[float, str]:
    """Largest |difference| of the test/val metrics of two results, and where it is."""
    a, b = eval_metrics(a), eval_metrics(b)
    if set(a) != set(b) or any(set(a[s]) != set(b[s]) for s in a):
        return math.inf, "different stages or metrics"
    worst, where = 0.0, ""
    for stage in a:
        for key in a[stage]:
            d = abs(float(a[stage][key]) - float(b[stage][key]))
            if d > worst:
                worst, where = d, f"{stage} {key}: {a[stage][key]:.6f} vs {b[stage][key]:.6f}"
    return worst, where


def val_epochs(run_dir: Path, stage: str) -> list[int]:
    """The epochs of the validation rows in ``logs/<stage>/metrics.csv``, in file order."""
    path = run_dir / "logs" / stage / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [int(float(r["epoch"])) for r in rows
            if any(k.startswith("val/") and v not in ("", None) for k, v in r.items())]


def temporaries(run_dir: Path) -> list[str]:
    return sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*.tmp"))


def weights_diff(a: Path, b: Path) -> float:
    """Largest |difference| between the saved weights of two run directories (``teacher.pt``
    when the run trained it, ``export/student.pt``); inf when one is missing or they differ in
    keys."""
    import torch

    worst = 0.0
    for name in ("teacher.pt", "export/student.pt"):
        pa, pb = a / name, b / name
        if not pa.is_file() and not pb.is_file():
            continue
        if not (pa.is_file() and pb.is_file()):
            return math.inf
        sa, sb = (torch.load(p, map_location="cpu", weights_only=True) for p in (pa, pb))
        if set(sa) != set(sb):
            return math.inf
        for k in sa:
            if sa[k].is_floating_point():
                worst = max(worst, float((sa[k].double() - sb[k].double()).abs().max()))
            elif not torch.equal(sa[k], sb[k]):
                return math.inf
    return worst


def straight_dir(ctx: Ctx, overrides: Sequence[str], env: dict | None = None) -> Path:
    key = hashlib.sha1(json.dumps([list(overrides), env or {}]).encode()).hexdigest()[:10]
    return ctx.shared / f"straight-{key}"


def straight(ctx: Ctx, overrides: Sequence[str], env: dict | None = None) -> dict:
    """Results of an uninterrupted run of ``overrides`` (computed once per shared dir)."""
    run_dir = straight_dir(ctx, overrides, env)
    key = run_dir.name.split("-", 1)[1]
    results = results_of(run_dir)
    if results is None:
        ctx.log(f"  straight run {key}: {' '.join(overrides)}")
        shutil.rmtree(run_dir, ignore_errors=True)
        sub = Ctx(ctx.shared, ctx.shared, inproc=False, log=ctx.log)
        res = run_kdkit(sub, run_dir, overrides, env, label=f"straight-{key}")
        results = results_of(run_dir)
        if res.rc != 0 or results is None:
            raise CaseError(f"the straight run failed (exit {res.rc}): {tail(res.stderr)}")
    return results


def last_error(text: str, width: int = 160) -> str:
    """The last ``SomethingError: ...`` line of a traceback, shortened."""
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and line.split(":", 1)[0].strip().replace(".", "").isidentifier()
             and line.split(":", 1)[0].strip().endswith(("Error", "Exception", "Interrupt"))]
    line = lines[-1] if lines else tail(text, 1)
    return line if len(line) <= width else line[: width - 3] + "..."


def tail(text: str, n: int = 3) -> str:
    return " / ".join(line.strip() for line in text.strip().splitlines()[-n:])


# ---- damaged files ------------------------------------------------------------------------------
class Evil:
    """A pickle that runs ``touch <marker>`` when it is loaded by an unrestricted unpickler."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_malicious(path: Path, marker: Path, kind: str = "torch") -> Path:
    """A malicious checkpoint: ``torch.save`` of a dict holding ``Evil`` (what a poisoned
    ``.ckpt`` / ``.pt`` looks like), or a bare pickle (``kind="pickle"``, torch's legacy format)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "torch":
        torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": 0, "global_step": 1,
                    "hook": Evil(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"state_dict": Evil(marker)}, protocol=2))
    return path


def truncate(path: Path, fraction: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def flip_middle(path: Path, n: int = 4096) -> Path:
    data = bytearray(path.read_bytes())
    mid = max(0, len(data) // 2 - n // 2)
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))
    return path


def flip_tensor_bytes(path: Path, n: int = 4096) -> Path:
    """Invert up to ``n`` bytes inside the data of the largest tensor of a ``torch.save`` zip
    (bit rot where torch's reader does not look: it does not check the members' CRCs)."""
    import struct

    with zipfile.ZipFile(path) as zf:
        member = max(zf.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[member.header_offset + 26:member.header_offset + 30])
    start = member.header_offset + 30 + name_len + extra_len
    count = min(n, member.file_size)
    data[start:start + count] = bytes(b ^ 0xFF for b in data[start:start + count])
    path.write_bytes(bytes(data))
    return path


def garbage(path: Path, size: int = 65536, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


# ---- checks -------------------------------------------------------------------------------------
def check_error(out: Outcome, res: Result, *names: str, code: int = 2) -> str:
    """A user error: exit ``code``, exactly one ``kdkit: error:`` line naming each of ``names``,
    no traceback. Fills ``out.exit_code`` / ``out.message``; returns the line."""
    out.exit_code = str(res.rc)
    out.values["names"] = list(names)
    line = res.errors[-1] if res.errors else ""
    lines = [text.rstrip() for text in res.stderr.splitlines() if text.strip()]
    more = lines[lines.index(line) + 1:] if line in lines else []
    if line:
        out.message = " ⏎ ".join([line, *more])
    elif "Traceback" in res.stderr:
        out.message = f"(no kdkit line; traceback) {last_error(res.stderr)}"
    else:
        out.message = f"(no kdkit line) {tail(res.stderr, 2)}" if res.stderr.strip() else "(nothing)"
    out.check(res.rc == code, f"exit code {res.rc}, expected {code}")
    out.check(len(res.errors) == 1, f"{len(res.errors)} 'kdkit: error:' lines, expected 1")
    out.check(not more, f"the message is not one line: {len(more)} more line(s) follow it")
    out.check("Traceback" not in res.stderr, "a traceback was printed")
    for name in names:
        out.check(name in line, f"the message does not name {name}")
    return line


def check_nothing_saved(out: Outcome, run_dir: Path) -> None:
    """After a refusal: no results, no checkpoint, no teacher.pt (nothing to lose, nothing bad)."""
    written = [p for p in ("results.json", "teacher.pt", "export/student.pt") if (run_dir / p).exists()]
    written += [p.relative_to(run_dir).as_posix() for p in run_dir.glob("checkpoints/*/*.ckpt")]
    out.check(not written, f"files written despite the error: {written}")
    out.data_lost = "none (nothing trained or saved)" if not written else f"wrote {written}"


def check_marker(out: Outcome, marker: Path) -> None:
    out.values["marker_exists"] = marker.exists()
    out.check(not marker.exists(), f"the malicious pickle ran: {marker} exists")


# ---- config values --------------------------------------------------------------------------------
def config_case(override: str, names: Sequence[str]):
    def fn(ctx: Ctx) -> Outcome:
        out = Outcome("")
        run_dir = ctx.dir / "run"
        res = run_kdkit(ctx, run_dir, [*SHORT, override])
        check_error(out, res, *names)
        check_nothing_saved(out, run_dir)
        return out
    return fn


def diverging_lr(ctx: Ctx) -> Outcome:
    """``task.optimizer.lr=1e6`` is a valid number: the teacher diverges at run time."""
    import torch

    out = Outcome("")
    run_dir = ctx.dir / "run"
    res = run_kdkit(ctx, run_dir, [*SHORT, "task.optimizer.lr=1e6"])
    line = check_error(out, res, "diverged at step", "not finite", "stage 'teacher'")
    out.values["line"] = line
    bad = []
    for ckpt in run_dir.glob("checkpoints/*/*.ckpt"):  # whatever was saved must be finite
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        bad += [f"{ckpt.name}:{k}" for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    out.check(not bad, f"non-finite weights were checkpointed: {bad[:3]}")
    saved = [p for p in ("teacher.pt", "results.json", "export/student.pt") if (run_dir / p).exists()]
    out.check(not saved, f"saved despite diverging: {saved}")
    out.data_lost = "none (nothing non-finite saved)" if not (bad or saved) else f"saved {bad + saved}"
    return out


def checkpoints_is_a_file(ctx: Ctx) -> Outcome:
    """The run directory cannot hold checkpoints: ``checkpoints`` is a regular file where the
    directory belongs (the tests run as root, whom a read-only mode would not stop)."""
    out = Outcome("")
    run_dir = ctx.dir / "run"
    run_dir.mkdir(parents=True)
    blocker = run_dir / "checkpoints"
    blocker.write_text("not a directory\n")
    res = run_kdkit(ctx, run_dir, SHORT)
    check_error(out, res, str(blocker))
    out.check(blocker.is_file() and blocker.read_text() == "not a directory\n", "the file was changed")
    out.data_lost = "none (nothing could be written; the file is untouched)"
    return out


# ---- teacher checkpoints ------------------------------------------------------------------------
def trained_teacher(ctx: Ctx) -> Path:
    """A real ``teacher.pt`` (digits ConvNet, 1 epoch), made once per shared dir."""
    run_dir = ctx.shared / "teacher-run"
    path = run_dir / "teacher.pt"
    if not path.is_file():
        ctx.log("  training a teacher to damage")
        shutil.rmtree(run_dir, ignore_errors=True)
        res = run_kdkit(ctx, run_dir, [*QUICK, "trainer.max_epochs=1", "stages.student=false"],
                        label="teacher")
        if res.rc != 0 or not path.is_file():
            raise CaseError(f"training the teacher failed (exit {res.rc}): {tail(res.stderr)}")
    return path


def teacher_ckpt_case(damage: str):
    def fn(ctx: Ctx) -> Outcome:
        out = Outcome("")
        good = trained_teacher(ctx)
        marker = ctx.dir / "PWNED"
        bad = ctx.dir / ("teacher.safetensors" if damage == "safetensors_truncated" else "teacher.pt")
        if damage == "garbage":
            garbage(bad)
        elif damage == "empty":
            bad.write_bytes(b"")
        elif damage == "truncated":
            shutil.copy(good, bad), truncate(bad)
        elif damage == "flipped":
            shutil.copy(good, bad), flip_middle(bad)
        elif damage in ("malicious", "malicious_pickle"):
            write_malicious(bad, marker, "torch" if damage == "malicious" else "pickle")
        elif damage == "safetensors_truncated":
            import torch
            from safetensors.torch import save_file

            save_file(torch.load(good, weights_only=True), str(bad))
            truncate(bad)
        res = run_kdkit(ctx, ctx.dir / "run", [*SHORT, f"teacher.ckpt_path={bad}"])
        line = check_error(out, res, str(bad))
        if damage.startswith("malicious"):
            check_marker(out, marker)
            out.check("trust_checkpoint" in line, "the refusal does not say how to trust the file")
        check_nothing_saved(out, ctx.dir / "run")
        return out
    return fn


# ---- kill -9 / signals and resume -------------------------------------------------------------------
def resume_and_compare(ctx: Ctx, out: Outcome, run_dir: Path, overrides: Sequence[str],
                       exact: bool, straight_overrides: Sequence[str] | None = None,
                       extra: Sequence[str] = (), env: dict | None = None,
                       stages: Sequence[str] = ("teacher", "student"), epochs: int = 12) -> Result:
    """Resume with ``ckpt_path=last``; check it completes and compare with a straight run."""
    res = run_kdkit(ctx, run_dir, [*overrides, "ckpt_path=last", *extra], env, label="resume")
    out.values["resume_rc"] = res.rc
    out.values["resume_lines"] = res.kdkit_lines
    out.check(res.rc == 0, f"the resumed run exited {res.rc}: {tail(res.stderr)}")
    out.check("Traceback" not in res.stderr, "the resumed run printed a traceback")
    resumed = results_of(run_dir)
    out.check(resumed is not None, "the resumed run wrote no results.json")
    left = temporaries(run_dir)
    out.values["temporaries"] = left
    out.check(not left, f"temporary files left after the resumed run: {left}")
    problems = []
    for stage in stages:
        seen = val_epochs(run_dir, stage)
        if seen != list(range(epochs)):
            problems.append(f"logs/{stage}/metrics.csv validation epochs {seen}")
    out.check(not problems, "; ".join(problems))
    diff, where, wdiff = math.inf, "no results", math.inf
    if resumed is not None:
        reference = straight(ctx, straight_overrides or overrides, env)
        diff, where = metric_diff(resumed, reference)
        wdiff = weights_diff(run_dir, straight_dir(ctx, straight_overrides or overrides, env))
    out.values.update(max_diff=diff, weights_diff=wdiff, exact=exact)
    if exact:
        out.check(diff <= TOL, f"resumed metrics differ from the straight run by {diff:.3g} ({where})")
        out.check(wdiff <= TOL, f"resumed weights differ from the straight run's by {wdiff:.3g}")
    if resumed is None or problems:
        out.data_lost = "; ".join(filter(None, ["no results" if resumed is None else "", *problems]))
    elif diff <= TOL and wdiff <= TOL:
        out.data_lost = ("none (test/val metrics and saved weights = the straight run's, to 1e-6; "
                         "each epoch's val row once)")
    else:
        shown = f"test/val metrics by {diff:.4f} ({where})" if diff > TOL else "test/val metrics equal"
        out.data_lost = (f"no epoch lost (each val row once); vs the straight run: {shown}, saved weights "
                         f"by up to {wdiff:.3g}" + ("" if exact else " (mid-epoch resume: not bit-exact)"))
    return res


def _resume_summary(res: Result) -> str:
    lines = [line for line in res.kdkit_lines if "resuming" in line or "warning" in line or "error" in line]
    return " / ".join(lines) or "(no kdkit line)"


def kill9_mid_stage(stage: str, epoch: int):
    def fn(ctx: Ctx) -> Outcome:
        out = Outcome("")
        run_dir = ctx.dir / "run"
        running = Running(ctx, run_dir, LONG, label="killed")
        wait_for_epoch(running, run_dir, stage, epoch)
        os.kill(running.pid, signal.SIGKILL)
        res = running.wait()
        at = ckpt_point(run_dir / "checkpoints" / stage / "last.ckpt")
        out.values["killed_after"] = at
        out.check(res.rc == -signal.SIGKILL, f"exit code {res.rc}, expected -9")
        out.check(not (run_dir / "stages" / f"{stage}.json").exists(), f"stage {stage} had finished: no fault")
        resumed = resume_and_compare(ctx, out, run_dir, LONG, exact=True)
        expected = f"resuming stage '{stage}' from {run_dir}/checkpoints/{stage}/last.ckpt"
        out.check(expected in " ".join(resumed.kdkit_lines), "the resume line does not name the stage's last.ckpt")
        out.exit_code = f"{res.rc} (SIGKILL) -> {resumed.rc} (resume)"
        out.message = f"(killed after epoch {at[0] if at else '?'}, no message) -> {_resume_summary(resumed)}"
        return out
    return fn


# (seconds after the first step checkpoint appears, then seconds after the next temporary
# checkpoint file is seen): varied moments, each aimed inside a write
KILL_WRITE_MOMENTS = ((0.0, 0.0), (0.3, 0.001), (0.8, 0.0005), (1.4, 0.002), (2.1, 0.003))
WRITES = [*LONG, "callbacks.checkpoint.every_n_train_steps=1"]


def _writing(directory: Path) -> bool:
    with contextlib.suppress(FileNotFoundError):
        return any(e.name.endswith(".tmp") for e in os.scandir(directory))
    return False


def kill9_during_writes(repeat: int):
    """Checkpoints written every step; kill -9 at a different moment of each repeat: a delay
    after the first checkpoint, then the moment a temporary checkpoint file exists (a write in
    progress) plus a small offset."""
    delay, offset = KILL_WRITE_MOMENTS[repeat]

    def fn(ctx: Ctx) -> Outcome:
        out = Outcome("")
        run_dir = ctx.dir / "run"
        running = Running(ctx, run_dir, WRITES, label="killed")
        first = run_dir / "checkpoints" / "teacher" / "last.ckpt"
        wait_until(running, first.exists, "the first checkpoint", timeout=300, poll=0.002)
        time.sleep(delay)
        stage_now = "student" if (run_dir / "stages" / "teacher.json").exists() else "teacher"
        directory = run_dir / "checkpoints" / stage_now
        deadline = time.monotonic() + 1.0
        while running.alive() and not _writing(directory) and time.monotonic() < deadline:
            pass  # busy-wait: a write lasts milliseconds
        seen = _writing(directory)
        time.sleep(offset)
        if not running.alive():
            raise CaseError("the run ended before the kill")
        os.kill(running.pid, signal.SIGKILL)
        res = running.wait()
        out.check(res.rc == -signal.SIGKILL, f"exit code {res.rc}, expected -9")
        tmps = temporaries(run_dir)
        stage = "student" if (run_dir / "stages" / "teacher.json").exists() else "teacher"
        points = {n: ckpt_point(run_dir / "checkpoints" / stage / n) for n in ("last.ckpt", "previous.ckpt")}
        out.values.update(killed_in=stage, temporary_seen=seen, temporaries_after_kill=tmps, points=points)
        # a step checkpoint: the resumed epoch goes on at its next batch (kdkit.resumable_loader)
        resumed = resume_and_compare(ctx, out, run_dir, WRITES, exact=True)
        text = " ".join(resumed.kdkit_lines)
        out.check(f"resuming stage '{stage}' from" in text and ("last.ckpt" in text or "previous.ckpt" in text),
                  f"no resume line for stage {stage} from last.ckpt or previous.ckpt")
        out.exit_code = f"{res.rc} (SIGKILL) -> {resumed.rc} (resume)"
        mid = (f"mid-write: left {', '.join(Path(t).name for t in tmps)}" if tmps
               else "a write was in progress, finished before the kill landed" if seen else "between writes")
        last = points["last.ckpt"]
        when = (f"{delay:.1f} s after the first checkpoint, "
                + (f"{offset * 1000:.1f} ms after a temporary appeared" if seen else "no temporary seen"))
        out.message = (f"(killed {when}; stage {stage}, last.ckpt at step {last[1] if last else '?'}, "
                       f"{mid}) -> {_resume_summary(resumed)}")
        return out
    return fn


STUDENT_SIGNAL = ["+callbacks.interrupt._target_=tests.faults.signals.SignalAtEpochEnd",
                  "+callbacks.interrupt.stage=student", "+callbacks.interrupt.epoch=3"]


def signal_at_epoch_end(signal_name: str):
    """The run signals itself (a real ``os.kill``) right after student epoch 3: the checkpoint
    is the epoch-end one, so the resume must be exact."""
    expected = 143 if signal_name == "SIGTERM" else 1

    def fn(ctx: Ctx) -> Outcome:
        out = Outcome("")
        run_dir = ctx.dir / "run"
        overrides = [*LONG, *STUDENT_SIGNAL, f"+callbacks.interrupt.signal_name={signal_name}"]
        res = run_kdkit(ctx, run_dir, overrides, label="signalled")
        out.check(res.rc == expected, f"exit code {res.rc}, expected {expected}")
        out.check("Traceback" not in res.stderr, "a traceback was printed")
        text = " ".join(res.kdkit_lines)
        out.check("interrupted at epoch" in text and "checkpoint written" in text,
                  "no 'interrupted ... checkpoint written' line")
        if signal_name == "SIGTERM":
            out.check("stopped by SIGTERM" in text, "no 'stopped by SIGTERM' line")
        out.check(not (run_dir / "stages" / "student.json").exists(), "the student stage finished: no fault")
        out.values["ckpt"] = ckpt_point(run_dir / "checkpoints" / "student" / "last.ckpt")
        resumed = resume_and_compare(ctx, out, run_dir, LONG, exact=True,
                                     extra=["resume.allow_changes=[callbacks.interrupt]"])
        out.check("after epoch 3" in " ".join(resumed.kdkit_lines), "the resume is not from after epoch 3")
        out.exit_code = f"{res.rc} -> {resumed.rc} (resume)"
        out.message = f"{' / '.join(res.kdkit_lines) or '(no kdkit line)'} -> {_resume_summary(resumed)}"
        return out
    return fn


def external_signal(signal_name: str):
    """SIGINT (a terminal's Ctrl-C) or SIGTERM (SLURM pre-emption: SIGKILL follows after a
    grace period) to the run's process group, mid-epoch of the student stage."""
    signum = getattr(signal, signal_name)
    expected = 143 if signal_name == "SIGTERM" else 1

    def fn(ctx: Ctx) -> Outcome:
        out = Outcome("")
        run_dir = ctx.dir / "run"
        running = Running(ctx, run_dir, LONG, label="signalled")
        wait_for_epoch(running, run_dir, "student", 3)
        time.sleep(0.02)  # into the next epoch's batches
        sent = time.monotonic()
        running.signal_group(signum)
        killed = False
        try:
            running.proc.wait(timeout=SLURM_GRACE_S)
        except subprocess.TimeoutExpired:
            running.signal_group(signal.SIGKILL)  # what SLURM does after KillWait
            killed = True
        exit_s = time.monotonic() - sent
        res = running.wait()
        out.values.update(exit_seconds=exit_s, sigkilled=killed)
        out.check(not killed, f"still running {SLURM_GRACE_S:.0f} s after {signal_name}: SIGKILLed")
        out.check(res.rc == expected, f"exit code {res.rc}, expected {expected}")
        out.check("Traceback" not in res.stderr, "a traceback was printed")
        text = " ".join(res.kdkit_lines)
        out.check("interrupted at epoch" in text and "checkpoint written" in text,
                  "no 'interrupted ... checkpoint written' line")
        point = ckpt_point(run_dir / "checkpoints" / "student" / "last.ckpt")
        out.values["ckpt"] = point
        out.check(not (run_dir / "stages" / "student.json").exists(), "the student stage finished: no fault")
        # SIGTERM stops after a finished step: exact. Ctrl-C lands inside a step, whose random
        # draws are spent when the checkpoint is written: the step is trained again with others.
        resumed = resume_and_compare(ctx, out, run_dir, LONG, exact=signal_name == "SIGTERM")
        out.exit_code = f"{res.rc} -> {resumed.rc} (resume)"
        out.message = (f"{' / '.join(res.kdkit_lines) or '(no kdkit line)'} (exited {exit_s:.1f} s after "
                       f"{signal_name}) -> {_resume_summary(resumed)}")
        return out
    return fn


# ---- damaged files of a killed run ------------------------------------------------------------------
def killed_run(ctx: Ctx) -> Path:
    """A run directory left by a real kill -9 in the student stage after epoch >= 3 (made once
    per shared dir; each case damages its own copy)."""
    src = ctx.shared / "killed-student"
    done = src / "KILLED"
    if not done.exists():
        ctx.log("  making a run directory with kill -9 in the student stage")
        shutil.rmtree(src, ignore_errors=True)
        sub = Ctx(ctx.shared / "killed-logs", ctx.shared, log=ctx.log)
        running = Running(sub, src, LONG, label="killed")
        wait_for_epoch(running, src, "student", 3)
        os.kill(running.pid, signal.SIGKILL)
        running.wait()
        if not (src / "checkpoints" / "student" / "previous.ckpt").is_file():
            raise CaseError("the killed run left no previous.ckpt")
        done.write_text("kill -9 in the student stage\n")
    dst = ctx.dir / "run"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("KILLED"))
    return dst


def resume_damaged(damage: str):
    def fn(ctx: Ctx) -> Outcome:
        out = Outcome("")
        run_dir = killed_run(ctx)
        ckpts = run_dir / "checkpoints" / "student"
        last, previous = ckpts / "last.ckpt", ckpts / "previous.ckpt"
        marker = ctx.dir / "PWNED"
        named: list[str] = []
        if damage == "last_truncated":
            truncate(last)
        elif damage == "last_flipped":
            flip_middle(last)
        elif damage == "last_tensor_flipped":
            flip_tensor_bytes(last)
        elif damage == "last_empty":
            last.write_bytes(b"")
        elif damage == "last_malicious":
            write_malicious(last, marker)
        elif damage == "both_corrupt":
            truncate(last), garbage(previous, size=previous.stat().st_size)
            named = [str(last), str(previous)]
        elif damage == "teacher_pt_truncated":
            truncate(run_dir / "teacher.pt")
            named = [str(run_dir / "teacher.pt")]
        elif damage == "stage_json_garbage":
            garbage(run_dir / "stages" / "teacher.json", size=300)
            named = [str(run_dir / "stages" / "teacher.json")]
        elif damage == "config_yaml_garbage":
            (run_dir / "config.yaml").write_text("trainer: [unclosed\n  max_epochs: 12: 3\n")
            named = [str(run_dir / "config.yaml")]
        elif damage == "metrics_csv_garbage":
            garbage(run_dir / "logs" / "student" / "metrics.csv", size=4096)
        if damage in ("last_truncated", "last_flipped", "last_tensor_flipped", "last_empty", "last_malicious",
                      "metrics_csv_garbage"):
            res = resume_and_compare(ctx, out, run_dir, LONG, exact=damage != "metrics_csv_garbage",
                                     stages=("teacher",) if damage == "metrics_csv_garbage" else ("teacher", "student"))
            text = " ".join(res.kdkit_lines)
            out.exit_code = str(res.rc)
            out.message = _resume_summary(res)
            if damage != "metrics_csv_garbage":
                out.check("kdkit: warning:" in text and "last.ckpt" in text and "previous.ckpt" in text,
                          "no one-line warning naming last.ckpt and the fallback to previous.ckpt")
                out.check(f"resuming stage 'student' from {previous}" in text, "did not resume from previous.ckpt")
            if damage == "last_malicious":
                check_marker(out, marker)
            if damage == "metrics_csv_garbage":
                kept = sorted(p.name for p in (run_dir / "logs" / "student").glob("metrics.csv*"))
                out.data_lost += (f"; logs/student: {kept}, the new metrics.csv has validation rows of "
                                  f"epochs {val_epochs(run_dir, 'student')}")
        else:
            res = run_kdkit(ctx, run_dir, [*LONG, "ckpt_path=last"], label="resume")
            check_error(out, res, *named)
            kept = [p for p in (last, previous) if p.exists()] if damage == "both_corrupt" else []
            out.data_lost = ("none (refused; nothing overwritten)" if not (run_dir / "results.json").exists()
                             else "results.json written from damaged state")
            if damage == "both_corrupt":
                out.notes.append(f"files left: {sorted(p.name for p in ckpts.iterdir())}; kept {len(kept)}")
        return out
    return fn


# ---- DDP rank death -----------------------------------------------------------------------------------
def ddp_rank_death(rank: int):
    """Kill -9 one rank of a 2-process gloo job mid-training; every process of the job must be
    gone within 60 s; then ``ckpt_path=last`` must resume and finish."""

    def fn(ctx: Ctx) -> Outcome:
        out = Outcome("")
        run_dir = ctx.dir / "run"
        running = Running(ctx, run_dir, DDP, label=f"ddp-kill-rank{rank}")
        rank1: list[int] = []

        def rank1_up() -> bool:
            rank1[:] = [p for p in children(running.pid) if "kdkit.train" in _cmdline(p)]
            return bool(rank1)

        wait_until(running, rank1_up, "rank 1 started", timeout=300, poll=0.1)
        wait_for_epoch(running, run_dir, "teacher", 1, timeout=600)
        members = group_members(running.pid)
        victim = running.pid if rank == 0 else rank1[0]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        while group_members(running.pid) and time.monotonic() - killed_at < 2 * EXIT_LIMIT_S:
            running.proc.poll()
            time.sleep(0.05)
        exit_s = time.monotonic() - killed_at
        left = group_members(running.pid)
        res = running.wait(timeout=5)  # kills what is left, if anything
        out.values.update(exit_seconds=exit_s, processes=members, left=left, rank0_rc=res.rc)
        out.check(not left and exit_s <= EXIT_LIMIT_S,
                  f"processes of the job still alive {exit_s:.0f} s after the kill: {left}")
        out.check(not (run_dir / "stages" / "teacher.json").exists(), "the teacher stage had finished")
        resumed = resume_and_compare(ctx, out, run_dir, DDP, exact=True, epochs=6)
        out.exit_code = f"rank 0: {res.rc} -> {resumed.rc} (resume)"
        kd = " / ".join(res.kdkit_lines) or (f"stderr of the ranks ends in a traceback: {last_error(res.stderr)}"
                                             if "Traceback" in res.stderr else "")
        out.message = (f"(rank {rank} pid {victim} SIGKILLed; all {len(members)} processes gone in "
                       f"{exit_s:.1f} s{'; ' + kd if kd else ''}) -> {_resume_summary(resumed)}")
        return out
    return fn


def ddp_sigterm(target: str):
    """SIGTERM to a DDP job: to every process of the job (its process group: what SLURM's
    pre-emption or ``scancel`` does), or to rank 0 alone (Lightning forwards it to rank 1).
    SIGKILL after the grace period if any process is left; then ``ckpt_path=last``."""

    def fn(ctx: Ctx) -> Outcome:
        return _ddp_sigterm(ctx, target)
    return fn


def _ddp_sigterm(ctx: Ctx, target: str) -> Outcome:
    out = Outcome("")
    run_dir = ctx.dir / "run"
    last = run_dir / "checkpoints" / "teacher" / "last.ckpt"
    running = Running(ctx, run_dir, DDP, {"PYTHONFAULTHANDLER": "1"}, label=f"ddp-sigterm-{target}")
    wait_for_epoch(running, run_dir, "teacher", 1, timeout=600)
    members = group_members(running.pid)
    before = ckpt_point(last)
    sent = time.monotonic()
    if target == "group":
        running.signal_group(signal.SIGTERM)
    else:
        os.kill(running.pid, signal.SIGTERM)
    while group_members(running.pid) and time.monotonic() - sent < SLURM_GRACE_S:
        running.proc.poll()
        time.sleep(0.05)
    exit_s = time.monotonic() - sent
    left = group_members(running.pid)
    stacks = _hung_stacks(running, left) if left else {}
    res = running.wait(timeout=10)
    after = ckpt_point(last)
    out.values.update(exit_seconds=exit_s, processes=members, left=left, rank0_rc=res.rc,
                      ckpt_before=before, ckpt_after=after)
    if left:
        written = after is not None and before is not None and after[1] > before[1]
        out.notes.append(
            f"the SIGTERM checkpoint (step {after[1]}) was written by rank 0 before the hang" if written
            else f"no SIGTERM checkpoint: the newest is the one before the signal (step "
                 f"{after[1] if after else '?'}); the steps after it were lost")
        out.values["hung_in"] = {who: hung_frames(text) for who, text in stacks.items()}
        out.notes.append("hung; where each process's main thread waited (faulthandler, on SIGABRT "
                         "before the SIGKILL; innermost first): " + " // ".join(
                             f"{who}: {' < '.join(frames) or '(no dump)'}"
                             for who, frames in out.values["hung_in"].items()))
    out.check(not left, f"{len(left)} process(es) still alive {SLURM_GRACE_S:.0f} s after SIGTERM: SIGKILLed")
    out.check(res.rc == 143, f"rank 0 exit code {res.rc}, expected 143")
    text = " / ".join(res.kdkit_lines)
    out.check("checkpoint written" in text, "no 'checkpoint written' line")
    out.check("Traceback" not in res.stderr, "a traceback was printed")
    # every rank stops after the same finished step (kdkit.callbacks.agreed_sigterm): exact
    resumed = resume_and_compare(ctx, out, run_dir, DDP, exact=True, epochs=6)
    if left:
        out.data_lost = f"job SIGKILLed after the {SLURM_GRACE_S:.0f} s grace; final results: {out.data_lost}"
    out.exit_code = f"rank 0: {res.rc} -> {resumed.rc} (resume)"
    shown = text or (f"traceback: {last_error(res.stderr)}" if "Traceback" in res.stderr else "(no kdkit line)")
    out.message = (f"{shown} (all {len(members)} processes gone {exit_s:.1f} s after SIGTERM"
                   f"{'' if not left else ', SIGKILLed'}) -> {_resume_summary(resumed)}")
    return out


def _hung_stacks(running: Running, pids: list[int]) -> dict[str, str]:
    """Where each hung process waits: all are stopped (SIGSTOP) so that none reacts to another's
    death, then each in turn gets SIGABRT + SIGCONT and faulthandler (``PYTHONFAULTHANDLER=1``)
    prints its threads' stacks to the shared stderr; then SIGKILL for what is left."""
    stacks = {}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    for pid in sorted(pids, key=lambda p: p == running.pid):  # rank 1 first, rank 0 last
        start = running.err_path.stat().st_size
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGABRT)
            os.kill(pid, signal.SIGCONT)
        time.sleep(2)
        with open(running.err_path, "rb") as f:
            f.seek(start)
            stacks["rank 0" if pid == running.pid else f"rank 1 (pid {pid})"] = f.read().decode(errors="replace")
    running.signal_group(signal.SIGCONT)
    running.signal_group(signal.SIGKILL)
    return stacks


def hung_frames(stderr: str, depth: int = 8) -> list[str]:
    """The innermost ``depth`` frames of each main thread that faulthandler dumped (the thread
    block whose stack reaches ``runpy``; observer threads are left out)."""
    found, block, frames = [], None, []

    def close():
        if block is not None and any("runpy" in f for f in frames):
            found.append(" < ".join(frames[:depth]))

    for line in stderr.splitlines() + [""]:
        text = line.strip()
        if text.startswith(("Current thread", "Thread 0x")):
            close()
            block, frames = text, []
        elif block is not None and text.startswith("File "):
            path, _, rest = text[5:].partition(", line ")
            number, _, func = rest.partition(" in ")
            frames.append(f"{Path(path.strip(chr(34))).name}:{number} {func}")
        elif block is not None:
            close()
            block, frames = None, []
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# ---- data files ---------------------------------------------------------------------------------------
def _data_env(ctx: Ctx) -> dict:
    return {"KDKIT_DATA_DIR": str(ctx.dir / "data"), "KDKIT_CACHE_DIR": str(ctx.dir / "cache")}


CIFAR = ["data=cifar10", "teacher=resnet20", "student=resnet8", *SMOKE, "data.batch_size=16",
         "data.eval_batch_size=32"]


def _copy_cifar(ctx: Ctx) -> Path:
    src = SHARED_DATA / "cifar10-jpeg"
    if not src.is_dir():
        raise CaseError(f"no CIFAR-10 archives at {src} (set KDKIT_DATA_DIR)")
    dst = ctx.dir / "data" / "cifar10-jpeg"
    dst.mkdir(parents=True)
    for archive in src.glob("*.tar.gz"):
        shutil.copy(archive, dst / archive.name)
    return dst


def cifar_archive(damage: str):
    def fn(ctx: Ctx) -> Outcome:
        out = Outcome("")
        archive = _copy_cifar(ctx) / "test.tar.gz"
        (truncate if damage == "truncated" else flip_middle)(archive)
        res = run_kdkit(ctx, ctx.dir / "run", CIFAR, _data_env(ctx))
        check_error(out, res, str(archive))
        check_nothing_saved(out, ctx.dir / "run")
        cached = list((ctx.dir / "cache").rglob("tensors-*.pt"))
        out.check(not cached, f"a tensor cache was written from a damaged archive: {cached}")
        return out
    return fn


def decoded_cifar_cache(ctx: Ctx) -> Path:
    """The real decoded-tensor cache of the shared archives (made once per shared dir)."""
    cache = ctx.shared / "cifar-cache"
    found = sorted(cache.rglob("tensors-*.pt"))
    if not found:
        ctx.log("  decoding the CIFAR-10 archives once")
        code = ("from pathlib import Path; from kdkit.datamodules.cifar10 import load_cifar10_arrays; "
                f"load_cifar10_arrays(Path({str(SHARED_DATA / 'cifar10-jpeg')!r}), "
                f"Path({str(cache / 'cifar10-jpeg')!r}))")
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env_for(), check=True,
                       capture_output=True, timeout=900)
        found = sorted(cache.rglob("tensors-*.pt"))
    return found[0]


def cifar_cache(damage: str):
    """The decoded-tensor cache (``$KDKIT_CACHE_DIR/cifar10-jpeg/tensors-*.pt``) damaged."""

    def fn(ctx: Ctx) -> Outcome:
        out = Outcome("")
        good = decoded_cifar_cache(ctx)
        bad = ctx.dir / "cache" / "cifar10-jpeg" / good.name
        bad.parent.mkdir(parents=True)
        marker = ctx.dir / "PWNED"
        if damage == "malicious":
            write_malicious(bad, marker)
        else:
            shutil.copy(good, bad), truncate(bad)
        env = {"KDKIT_DATA_DIR": str(SHARED_DATA), "KDKIT_CACHE_DIR": str(ctx.dir / "cache")}
        res = run_kdkit(ctx, ctx.dir / "run", CIFAR, env)
        check_error(out, res, str(bad))
        if damage == "malicious":
            check_marker(out, marker)
        check_nothing_saved(out, ctx.dir / "run")
        return out
    return fn


SCIFACT = ["experiment=scifact_minilm", *SMOKE, "data.batch_size=4"]


def beir_bad_line(ctx: Ctx) -> Outcome:
    """A BEIR corpus.jsonl with one line cut short in the middle of the file."""
    out = Outcome("")
    zipped = SHARED_DATA / "beir" / "scifact.zip"
    if not zipped.is_file():
        raise CaseError(f"no {zipped} (set KDKIT_DATA_DIR)")
    folder = ctx.dir / "data" / "beir" / "scifact"  # <data_dir>/beir/<name>/ wins over the zip
    with zipfile.ZipFile(zipped) as zf:
        zf.extractall(folder)
    corpus = next(folder.rglob("corpus.jsonl"))
    lines = corpus.read_text(encoding="utf-8").splitlines(keepends=True)
    bad_line = len(lines) // 2
    lines[bad_line - 1] = lines[bad_line - 1][: len(lines[bad_line - 1]) // 2] + "\n"
    corpus.write_text("".join(lines), encoding="utf-8")
    res = run_kdkit(ctx, ctx.dir / "run", SCIFACT, _data_env(ctx))
    check_error(out, res, str(corpus))
    out.check(f"line {bad_line}" in out.message, f"the message does not name line {bad_line}")
    check_nothing_saved(out, ctx.dir / "run")
    return out


CORA = ["experiment=cora_glnn", *SMOKE]


def graph_file(damage: str):
    """A Planetoid raw file damaged (Cora's ``ind.cora.graph`` pickle truncated, or
    ``ind.cora.x`` replaced by garbage)."""
    name = "ind.cora.graph" if damage == "graph_truncated" else "ind.cora.x"

    def fn(ctx: Ctx) -> Outcome:
        out = Outcome("")
        src = SHARED_DATA / "planetoid" / "Cora" / "raw"
        if not src.is_dir():
            raise CaseError(f"no {src} (set KDKIT_DATA_DIR)")
        raw = ctx.dir / "data" / "planetoid" / "Cora" / "raw"
        shutil.copytree(src, raw)
        if damage == "graph_truncated":
            truncate(raw / name)
        else:
            garbage(raw / name, size=(raw / name).stat().st_size)
        res = run_kdkit(ctx, ctx.dir / "run", CORA, _data_env(ctx))
        check_error(out, res, name)
        out.values["names_source"] = str(raw / name) in out.message
        check_nothing_saved(out, ctx.dir / "run")
        return out
    return fn


CLIP_CSV = ["experiment=cifar10_clip", "data=image_text_csv", *SMOKE, "data.batch_size=4",
            "data.eval_batch_size=4", "data.num_workers=0", "data.image_size=32"]


def csv_pairs(damage: str):
    """A CSV pairs file whose rows list an image that is missing or truncated, or a pairs file
    of random bytes."""

    def fn(ctx: Ctx) -> Outcome:
        from PIL import Image

        out = Outcome("")
        folder = ctx.dir / "pairs"
        (folder / "img").mkdir(parents=True)
        rng = random.Random(0)
        rows = []
        for i in range(8):
            path = folder / "img" / f"{i}.png"
            Image.frombytes("RGB", (32, 32), rng.randbytes(32 * 32 * 3)).save(path)
            rows.append((f"img/{i}.png", f"a photo number {i}"))
        bad = folder / "img" / "3.png"
        pairs = folder / "pairs.csv"
        pairs.write_text("filepath,title\n" + "".join(f"{p},{t}\n" for p, t in rows))
        if damage == "missing_image":
            bad.unlink()
        elif damage == "truncated_image":
            truncate(bad, 0.3)
        else:  # the pairs file itself: random bytes
            garbage(pairs, size=4096)
            bad = pairs
        res = run_kdkit(ctx, ctx.dir / "run", [*CLIP_CSV, f"data.train_file={pairs}"])
        check_error(out, res, str(bad))
        check_nothing_saved(out, ctx.dir / "run")
        return out
    return fn


# ---- the registry -----------------------------------------------------------------------------------
CASES: list[Case] = [
    Case("config: task.optimizer.lr=nan", "config", "a NaN learning rate",
         config_case("task.optimizer.lr=nan", ["task.optimizer.lr"]), inproc=True),
    Case("config: task.optimizer.lr=1e6", "config", "a learning rate that diverges at run time",
         diverging_lr, inproc=True),
    Case("config: distiller.kd.weight=-1", "config", "a negative distiller weight",
         config_case("distiller.kd.weight=-1", ["distiller.kd.weight"]), inproc=True),
    Case("config: distiller.kd.temperature=0", "config", "a zero temperature",
         config_case("distiller.kd.temperature=0", ["distiller.kd.temperature"]), inproc=True),
    Case("config: trainer.max_epochs=0", "config", "no epochs",
         config_case("trainer.max_epochs=0", ["trainer.max_epochs"]), inproc=True),
    Case("config: data.batch_size=0", "config", "an empty batch",
         config_case("data.batch_size=0", ["data.batch_size"]), inproc=True),
    Case("config: distiller=[nope]", "config", "an unknown distiller (Hydra group option)",
         config_case("distiller=[nope]", ["nope"])),
    Case("config: distiller.kd.temprature=4", "config", "a misspelt key",
         config_case("distiller.kd.temprature=4", ["temprature"])),
    Case("config: checkpoints/ is a file", "config", "an output dir that cannot hold checkpoints",
         checkpoints_is_a_file, inproc=True),
    *[Case(f"teacher ckpt: {d.replace('_', ' ')}", "teacher checkpoint", f"teacher.ckpt_path= {d}",
           teacher_ckpt_case(d), inproc=True)
      for d in ("garbage", "truncated", "empty", "flipped", "malicious", "malicious_pickle",
                "safetensors_truncated")],
    Case("kill -9: teacher stage, after epoch >= 4", "kill", "SIGKILL mid teacher stage, resume",
         kill9_mid_stage("teacher", 4)),
    Case("kill -9: student stage, after epoch >= 3", "kill", "SIGKILL mid student stage, resume",
         kill9_mid_stage("student", 3)),
    *[Case(f"kill -9 during checkpoint writes #{i + 1}", "kill",
           f"SIGKILL {d:.1f} s + {o * 1000:.1f} ms into a write, checkpoint every step; resume",
           kill9_during_writes(i))
      for i, (d, o) in enumerate(KILL_WRITE_MOMENTS)],
    Case("SIGINT at student epoch-3 end", "signal", "Ctrl-C (os.kill on itself) at an epoch end",
         signal_at_epoch_end("SIGINT")),
    Case("SIGTERM at student epoch-3 end", "signal", "SIGTERM (os.kill on itself) at an epoch end",
         signal_at_epoch_end("SIGTERM")),
    Case("SIGINT to the group, mid student epoch", "signal", "Ctrl-C from outside, mid-epoch",
         external_signal("SIGINT")),
    Case("SIGTERM to the group, mid student epoch (SLURM)", "signal",
         "SIGTERM from outside, SIGKILL after 30 s if alive", external_signal("SIGTERM")),
    Case("DDP: kill -9 rank 1", "ddp", "SIGKILL of rank 1 of 2 (gloo)", ddp_rank_death(1)),
    Case("DDP: kill -9 rank 0", "ddp", "SIGKILL of rank 0 of 2 (gloo)", ddp_rank_death(0)),
    Case("DDP: SIGTERM to the job (SLURM)", "ddp", "SIGTERM to both ranks, SIGKILL after 30 s",
         ddp_sigterm("group")),
    Case("DDP: SIGTERM to rank 0 only", "ddp", "SIGTERM to rank 0 (Lightning forwards it), "
         "SIGKILL after 30 s", ddp_sigterm("rank0")),
    Case("resume: last.ckpt truncated", "resume files", "falls back to previous.ckpt",
         resume_damaged("last_truncated")),
    Case("resume: last.ckpt empty", "resume files", "a zero-byte newest checkpoint",
         resume_damaged("last_empty")),
    Case("resume: last.ckpt 4 KB flipped", "resume files", "bit rot in the newest checkpoint",
         resume_damaged("last_flipped")),
    Case("resume: last.ckpt tensor bytes flipped", "resume files",
         "bit rot inside the newest checkpoint's largest tensor", resume_damaged("last_tensor_flipped")),
    Case("resume: last.ckpt malicious", "resume files", "a poisoned last.ckpt",
         resume_damaged("last_malicious")),
    Case("resume: last and previous corrupt", "resume files", "no loadable checkpoint",
         resume_damaged("both_corrupt")),
    Case("resume: teacher.pt truncated", "resume files", "the run's own teacher weights damaged",
         resume_damaged("teacher_pt_truncated")),
    Case("resume: stages/teacher.json garbage", "resume files", "a finished stage's record damaged",
         resume_damaged("stage_json_garbage")),
    Case("resume: config.yaml garbage", "resume files", "the interrupted run's config damaged",
         resume_damaged("config_yaml_garbage")),
    Case("resume: metrics.csv garbage", "resume files", "the interrupted stage's log damaged",
         resume_damaged("metrics_csv_garbage")),
    Case("data: CIFAR-10 test.tar.gz truncated", "data", "archive cut in half", cifar_archive("truncated")),
    Case("data: CIFAR-10 test.tar.gz 4 KB flipped", "data", "4 KB inverted mid-archive",
         cifar_archive("flipped")),
    Case("data: CIFAR-10 tensor cache truncated", "data", "decoded cache cut in half", cifar_cache("truncated")),
    Case("data: CIFAR-10 tensor cache malicious", "data", "a poisoned decoded cache", cifar_cache("malicious")),
    Case("data: BEIR corpus.jsonl bad line", "data", "a line cut short", beir_bad_line),
    Case("data: Cora ind.cora.graph truncated", "data", "a raw pickle cut in half", graph_file("graph_truncated")),
    Case("data: Cora ind.cora.x garbage", "data", "a raw file of random bytes", graph_file("x_garbage")),
    Case("data: CSV pairs, missing image", "data", "a listed image absent", csv_pairs("missing_image")),
    Case("data: CSV pairs, truncated image", "data", "a listed PNG cut short", csv_pairs("truncated_image")),
    Case("data: CSV pairs file is random bytes", "data", "the pairs file itself garbage", csv_pairs("garbage")),
]
BY_NAME = {case.name: case for case in CASES}

# Cases that fail because of a kdkit bug found by this suite (see the benchmark's notes):
# name -> (reason, strict). The tests mark them xfail; remove an entry once the bug is fixed.
KNOWN_BUGS: dict[str, tuple[str, bool]] = {
}
assert len(BY_NAME) == len(CASES), "case names must be unique"


def run_case(case: Case, ctx: Ctx) -> Outcome:
    """Run ``case`` in ``ctx`` (its ``dir`` is made fresh); never raises: a case that could not
    inject its fault is an outcome with that failure."""
    shutil.rmtree(ctx.dir, ignore_errors=True)
    ctx.dir.mkdir(parents=True)
    ctx.shared.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    try:
        out = case.fn(ctx)
    except CaseError as err:
        out = Outcome("", failures=[f"fault not injected: {err}"], message="-", data_lost="-")
    out.case = case.name
    out.seconds = round(time.monotonic() - start, 1)
    (ctx.dir / "outcome.json").write_text(json.dumps(
        {k: v for k, v in out.__dict__.items()}, indent=2, default=str))
    return out
