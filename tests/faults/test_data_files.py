"""Damaged data files of the real datasets (copies of $KDKIT_DATA_DIR): one line naming the file,
exit 2, nothing trained or saved."""

import pytest

from tests.faults.helpers import assert_marker_absent, assert_one_line_error, case_params


@pytest.mark.slow
@pytest.mark.parametrize("name", case_params("data"))
def test_damaged_data_file(run_fault, data_dir, name):
    out = run_fault(name)
    assert_one_line_error(out)
    assert out.data_lost.startswith("none"), out.data_lost
    if "malicious" in name:
        assert_marker_absent(out)
