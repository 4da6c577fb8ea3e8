"""Fixtures of the fault-injection tests: a shared scratch dir and ``run_fault(name)``."""

from __future__ import annotations

import json

import pytest

from tests.faults.cases import BY_NAME, Ctx, run_case


@pytest.fixture(scope="session")
def fault_shared(tmp_path_factory):
    """Reused by every case of the session: straight runs, a trained teacher, decoded data."""
    return tmp_path_factory.mktemp("fault-shared")


@pytest.fixture
def run_fault(tmp_path, fault_shared):
    """``run_fault(name, inproc=False)`` -> the case's Outcome (printed, for -rA / failures)."""

    def _run(name: str, inproc: bool = False):
        out = run_case(BY_NAME[name], Ctx(tmp_path / "case", fault_shared, inproc=inproc, log=print))
        print(json.dumps(out.__dict__, indent=1, default=str))
        return out

    return _run
