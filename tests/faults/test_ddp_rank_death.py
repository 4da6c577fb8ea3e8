"""A 2-process DDP job (gloo, CPU) losing a rank to kill -9, or pre-empted with SIGTERM: every
process must be gone within 60 s (SLURM's 30 s grace for SIGTERM), and ``ckpt_path=last`` must
resume the job and finish it."""

import pytest

from tests.faults.cases import EXIT_LIMIT_S, SLURM_GRACE_S
from tests.faults.helpers import assert_resumed, case_params


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("name", case_params("ddp"))
def test_ddp_job_exits_and_resumes(run_fault, name):
    out = run_fault(name)
    limit = SLURM_GRACE_S if "SIGTERM" in name else EXIT_LIMIT_S
    assert out.values["left"] == [], out.values["left"]
    assert out.values["exit_seconds"] <= limit, out.values["exit_seconds"]
    print(f"{name}: every process gone {out.values['exit_seconds']:.1f} s after the fault")
    assert_resumed(out)
