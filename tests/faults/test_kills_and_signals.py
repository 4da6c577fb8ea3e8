"""kill -9 mid-stage and during checkpoint writes, Ctrl-C and SIGTERM: real signals to a real
``python -m kdkit.train``, then ``ckpt_path=last``; the resumed run is compared with a straight
run of the same overrides and seed (exact, except after a Ctrl-C that landed inside a step)."""

import pytest

from tests.faults.cases import SLURM_GRACE_S
from tests.faults.helpers import assert_resumed, case_params


@pytest.mark.slow
@pytest.mark.parametrize("name", case_params("kill"))
def test_kill9_then_resume(run_fault, name):
    out = run_fault(name)
    assert out.exit_code.startswith("-9 (SIGKILL) -> 0"), out.exit_code
    assert_resumed(out)


@pytest.mark.slow
@pytest.mark.parametrize("name", case_params("signal"))
def test_signal_then_resume(run_fault, name):
    out = run_fault(name)
    expected = "143" if "SIGTERM" in name else "1"
    assert out.exit_code.split(" ")[0] == expected, out.exit_code
    assert "checkpoint written" in out.message, out.message
    if "exit_seconds" in out.values:  # from outside: gone within SLURM's grace, no SIGKILL needed
        assert out.values["exit_seconds"] < SLURM_GRACE_S and not out.values["sigkilled"]
    assert_resumed(out)
