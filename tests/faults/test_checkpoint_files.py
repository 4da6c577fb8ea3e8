"""Damaged, empty and malicious checkpoints: the teacher's (``teacher.ckpt_path``) and the
files a resumed run reads (``last.ckpt`` / ``previous.ckpt``, ``teacher.pt``,
``stages/*.json``, ``config.yaml``, ``metrics.csv``) in a directory left by a real kill -9."""

import pytest

from tests.faults.helpers import assert_marker_absent, assert_one_line_error, assert_resumed, case_params


@pytest.mark.parametrize("name", case_params("teacher checkpoint", inproc_only=True))
def test_damaged_teacher_checkpoint_in_process(run_fault, name):
    out = run_fault(name, inproc=True)
    assert_one_line_error(out)
    if "malicious" in name:
        assert_marker_absent(out)


@pytest.mark.slow
@pytest.mark.parametrize("name", case_params("teacher checkpoint"))
def test_damaged_teacher_checkpoint_by_the_cli(run_fault, name):
    out = run_fault(name)
    assert_one_line_error(out)
    if "malicious" in name:
        assert_marker_absent(out)


@pytest.mark.slow
@pytest.mark.parametrize("name", case_params("resume files"))
def test_damaged_file_of_a_killed_run_on_resume(run_fault, name):
    out = run_fault(name)
    if "resume_rc" in out.values:  # a fallback (or a log started anew): the run must finish
        assert_resumed(out)
        if "last.ckpt" in name:
            assert "previous.ckpt" in out.message and "kdkit: warning:" in out.message
    else:
        assert_one_line_error(out)
    if "malicious" in name:
        assert_marker_absent(out)
