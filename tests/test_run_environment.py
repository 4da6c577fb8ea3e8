"""environment.json: what a run's numbers depend on beyond its config, per start of the run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdkit.run_environment import (ARITHMETIC_VARIABLES, arithmetic_changes, describe, distinct_starts, environment,
                                   kdkit_source, read_starts, record_start)

ROOT = Path(__file__).resolve().parents[1]


def test_the_record_names_versions_kernels_threads_and_commit():
    env = environment()
    assert env["torch"] == torch.__version__
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["torch_threads"] == torch.get_num_threads()
    assert env["gpus"] == ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                           if torch.cuda.is_available() else [])
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, check=False,
                          text=True).stdout.strip()
    if head:  # a checkout (CI's fresh clone is one): the record names its commit
        assert env["kdkit_commit"].split("+")[0] == head


def test_a_capped_instruction_set_is_recorded_as_torch_uses_it():
    """torch reads ATEN_CPU_CAPABILITY at import, so this needs a fresh process."""
    code = "import json; from kdkit.run_environment import environment; print(json.dumps(environment()))"
    env = {k: v for k, v in os.environ.items() if k not in ARITHMETIC_VARIABLES}
    env.update(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert record["cpu_capability"] == "AVX2"
    assert record["variables"] == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert "ATEN_CPU_CAPABILITY=avx2,ONEDNN_MAX_CPU_ISA=AVX2" in describe(record)


def test_only_arithmetic_facts_count_as_changes():
    a = {**environment(), "host": "node1", "python": "3.11.7"}
    assert arithmetic_changes(a, {**a, "host": "node2", "python": "3.12.1"}) == []
    b = {**a, "cpu_capability": "AVX2", "torch_threads": 7}
    assert arithmetic_changes(a, b) == [f"cpu_capability: {a['cpu_capability']} -> AVX2",
                                        f"torch_threads: {a['torch_threads']} -> 7"]
    assert distinct_starts([a, {**a, "host": "x"}, b, b]) == [a, b]


def test_a_fresh_start_replaces_the_file_and_a_resume_appends(tmp_path, capsys):
    record_start(tmp_path, resuming=False)
    record_start(tmp_path, resuming=True)
    starts = read_starts(tmp_path)
    assert [s["resumed"] for s in starts] == [False, True]
    assert "warning" not in capsys.readouterr().err  # same process, same arithmetic
    record_start(tmp_path, resuming=False)
    assert [s["resumed"] for s in read_starts(tmp_path)] == [False]


def test_a_resume_with_other_threads_warns_and_keeps_both(tmp_path, capsys):
    threads = torch.get_num_threads()
    other = 1 if threads > 1 else 2
    record_start(tmp_path, resuming=False)
    try:
        torch.set_num_threads(other)
        record_start(tmp_path, resuming=True)
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert "kdkit: warning: resuming" in err and f"torch_threads: {threads} -> {other}" in err
    assert [s["torch_threads"] for s in read_starts(tmp_path)] == [threads, other]


def test_a_missing_or_damaged_file_is_no_record(tmp_path):
    assert read_starts(tmp_path) == []
    (tmp_path / "environment.json").write_text('{"starts": [')
    assert read_starts(tmp_path) == []
    record_start(tmp_path, resuming=True)  # a resume of a run from before the record: starts one
    assert len(read_starts(tmp_path)) == 1


def test_the_source_hash_follows_python_files_only(tmp_path):
    pkg, data = tmp_path / "kdkit", tmp_path / "datamodules"
    (pkg / "losses").mkdir(parents=True)
    data.mkdir()
    (pkg / "losses" / "kd.py").write_text("T = 4\n")
    (data / "cifar.py").write_text("MEAN = 0.5\n")
    (pkg / "notes.md").write_text("a")
    roots = {"kdkit": pkg, "kdkit.datamodules": data}
    first = kdkit_source(roots)
    assert len(first) == 16 and first == kdkit_source(roots)
    (pkg / "notes.md").write_text("b")  # not code: no other arithmetic
    assert kdkit_source(roots) == first
    (pkg / "losses" / "kd.py").write_text("T = 2\n")
    changed = kdkit_source(roots)
    assert changed != first
    (data / "cifar.py").rename(data / "svhn.py")  # same bytes, other module
    assert kdkit_source(roots) not in (first, changed)


def test_the_running_checkout_hashes_kdkit_and_its_datamodules():
    import importlib.util

    installed = Path(importlib.util.find_spec("kdkit").submodule_search_locations[0]).resolve()
    if installed != ROOT / "kdkit":
        pytest.skip("a non-editable install hashes its own copy (kdkit/datamodules inside kdkit/)")
    assert environment()["kdkit_source"] == kdkit_source({"kdkit": ROOT / "kdkit", "kdkit.datamodules": ROOT / "datamodules"})


def test_a_new_commit_with_the_same_source_is_the_same_arithmetic():
    a = {**environment(), "kdkit_commit": "abc1234", "kdkit_source": "00ff"}
    assert arithmetic_changes(a, {**a, "kdkit_commit": "def5678"}) == []  # e.g. a benchmarks-only commit
    assert arithmetic_changes(a, {**a, "kdkit_source": "11ee"}) == ["kdkit_source: 00ff -> 11ee"]
    old = {k: v for k, v in a.items() if k != "kdkit_source"}  # written before kdkit hashed its source
    assert arithmetic_changes(old, {**a, "kdkit_commit": "def5678"}) == ["kdkit_commit: abc1234 -> def5678"]
    assert arithmetic_changes(old, a) == []
