"""Impossible config values are refused at start-up with one line; lr=1e6 stops at run time.

Fast: in this process (``compose`` + ``run_or_explain``). Slow: the same cases through
``python -m kdkit.train`` (real exit codes; Hydra's own parse errors included).
"""

import pytest

from tests.faults.helpers import assert_one_line_error, case_params


@pytest.mark.parametrize("name", case_params("config", inproc_only=True))
def test_config_value_refused_in_process(run_fault, name):
    out = run_fault(name, inproc=True)
    assert_one_line_error(out)
    assert out.data_lost.startswith("none"), out.data_lost


@pytest.mark.slow
@pytest.mark.parametrize("name", case_params("config"))
def test_config_value_refused_by_the_cli(run_fault, name):
    out = run_fault(name)
    assert_one_line_error(out)
    assert out.data_lost.startswith("none"), out.data_lost
