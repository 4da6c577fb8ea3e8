"""What a run's numbers depend on besides its config, recorded in ``environment.json``.

The same config and seed give the same numbers to the last digit only with the same arithmetic:
the same kernels (torch picks its CPU kernels by instruction set, so an AVX-512 machine and an
AVX2-only one round differently from the first step), the same number of torch threads (another
summation order), the same library versions, the same GPU. kdkit measured this on its own
benchmark teacher: retrained by one command it came back identical three times on earlier EPYC VMs
(AVX2 kernels, we infer: their kernel set was not recorded then), 0.14 points away on an AVX-512
one, and identical again on that AVX-512 CPU with its kernels capped to AVX2 (``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``, ``MKL_ENABLE_INSTRUCTIONS``;
``benchmarks/results/teacher_data.md``).

``environment.json`` keeps one record per start of the run directory (the first, then each
``ckpt_path=last`` resume), so a run finished on another machine than it began says so; a resume
whose arithmetic differs from the interrupted start's gets a warning naming what changed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from pathlib import Path

from kdkit.checkpoint_io import write_atomically
from kdkit.errors import say

FILE = "environment.json"

# Variables that cap the instruction set torch, oneDNN and MKL use (to match an older CPU's
# arithmetic on a newer one) or make MKL's results independent of the CPU it runs on. (cuBLAS's
# workspace variable is left out: Lightning sets it itself from trainer.deterministic, a config key.)
ARITHMETIC_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
                        "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")

# Facts whose change changes the arithmetic, so a resumed run no longer matches an uninterrupted
# one bit for bit; the rest (host, date, Python, the commit) are kept for the record only. kdkit's
# own code counts by its source hash, not its commit: a commit that touched only benchmarks or docs
# changes no number, and two different uncommitted edits share one "<commit>+dirty".
ARITHMETIC_FACTS = ("kdkit_source", "torch", "lightning", "cuda", "cudnn", "cpu", "cpu_capability",
                    "torch_threads", "gpus", "variables")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def kdkit_commit() -> str | None:
    """The git commit of the kdkit checkout in use, with ``+dirty`` when tracked files differ
    from it; None for an installed (non-checkout) kdkit or without git."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, check=False,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, check=False,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (rev + ("+dirty" if dirty else "")) or None


def kdkit_source(roots: dict[str, Path] | None = None) -> str | None:
    """A 16-hex-digit hash of the Python source kdkit runs: every ``*.py`` file (path and bytes)
    of the ``kdkit`` package and its datamodules (``kdkit.datamodules``: the repository's
    ``datamodules/`` in a checkout). ``roots`` (name -> folder) replaces the installed ones."""
    import hashlib
    import importlib.util

    if roots is None:
        roots = {}
        for name in ("kdkit", "kdkit.datamodules"):
            spec = importlib.util.find_spec(name)
            for folder in (spec.submodule_search_locations or []) if spec else []:
                roots.setdefault(name, Path(folder))
    digest = hashlib.blake2b(digest_size=8)
    for name, folder in sorted(roots.items()):
        for path in sorted(Path(folder).rglob("*.py")):
            digest.update(f"{name}/{path.relative_to(folder).as_posix()}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest() if roots else None


def environment() -> dict:
    """This process's facts: versions, CPU and its kernel set, threads, GPUs, capping variables."""
    import lightning
    import torch

    import kdkit

    cuda = torch.cuda.is_available()
    return {
        "kdkit": kdkit.__version__,
        "kdkit_commit": kdkit_commit(),
        "kdkit_source": kdkit_source(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "variables": {k: os.environ[k] for k in ARITHMETIC_VARIABLES if k in os.environ},
        "host": platform.node(),
    }


def arithmetic_changes(before: dict, after: dict) -> list[str]:
    """``"fact: old -> new"`` for every arithmetic fact that differs between two records. A record
    written before kdkit hashed its source is compared by its commit instead."""
    facts = ARITHMETIC_FACTS if "kdkit_source" in before else \
        tuple("kdkit_commit" if k == "kdkit_source" else k for k in ARITHMETIC_FACTS)
    return [f"{k}: {_show(before.get(k))} -> {_show(after.get(k))}" for k in facts if before.get(k) != after.get(k)]


def _show(value) -> str:
    if value in (None, [], {}):
        return "none"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def last_start(out: Path) -> dict:
    """The run's newest record (what ``record_start`` wrote for this process), or this process's
    facts where the run directory has none."""
    starts = read_starts(out)
    return starts[-1] if starts else environment()


def read_starts(out: Path) -> list[dict]:
    """The records of ``out/environment.json``, oldest first; [] when absent or unreadable (an
    old run directory, or a file cut short: the record is provenance, never a reason to stop)."""
    try:
        starts = json.loads((Path(out) / FILE).read_text()).get("starts", [])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return []
    return [s for s in starts if isinstance(s, dict)]


def record_start(out: Path, resuming: bool) -> dict:
    """Add this start's record to ``out/environment.json`` (rank 0 writes) and return it.

    A fresh run replaces the file; a resume (``ckpt_path=last``) appends, and warns when its
    arithmetic differs from the last start's, since the finished part was computed with the old one.
    """
    from lightning.pytorch.utilities import rank_zero_only  # here: kdkit-report reads records without lightning

    now = {"started": dt.datetime.now().isoformat(timespec="seconds"), "resumed": resuming, **environment()}
    starts = read_starts(out) if resuming else []
    if starts:
        changes = arithmetic_changes(starts[-1], now)
        if changes:
            say(f"resuming {out} with other arithmetic than its last start ({'; '.join(changes)}): the "
                "finished part was computed with the old, so the numbers will not match an "
                "uninterrupted run's to the last digit (environment.json keeps both)", warning=True)
    if rank_zero_only.rank == 0:  # as ``stage_fit.write_on_rank_zero`` writes the run's other files
        write_atomically(Path(out) / FILE, json.dumps({"starts": [*starts, now]}, indent=2))
    return now


def describe(record: dict) -> str:
    """One line for people: ``torch 2.14.1, AMD EPYC (AVX512), 2 torch threads, no GPU``."""
    gpus = ", ".join(record.get("gpus") or []) or "no GPU"
    text = (f"torch {record.get('torch')}, {record.get('cpu')} ({record.get('cpu_capability')}), "
            f"{record.get('torch_threads')} torch threads, {gpus}")
    if record.get("variables"):
        text += f"; {_show(record['variables'])}"
    if record.get("kdkit_commit"):
        text += f"; kdkit {record['kdkit_commit']}"
    return text


def distinct_starts(starts: list[dict]) -> list[dict]:
    """The first start and each later one whose arithmetic differs from the start before it."""
    return [s for i, s in enumerate(starts) if not i or arithmetic_changes(starts[i - 1], s)]


def start_line(start: dict) -> str:
    """``started 2026-12-07T03:00:00: torch 2.14.1, ...`` (or ``resumed ...``)."""
    return f"{'resumed' if start.get('resumed') else 'started'} {start.get('started', '?')}: {describe(start)}"
