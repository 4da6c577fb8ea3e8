"""Loader options of the image datamodules: refused up front, in one line, when a DataLoader
would only reject them deep inside a run."""

from __future__ import annotations

import pytest

from kdkit.datamodules.base import ImageDataModule, check_loader_options
from kdkit.errors import KdkitError
from tests.datamodules.fault_helpers import one_line


@pytest.mark.parametrize("options, message", [
    ({"batch_size": 0}, "data.batch_size=0 must be a whole number >= 1 (samples per batch)"),
    ({"batch_size": -4}, "data.batch_size=-4 must be a whole number >= 1 (samples per batch)"),
    ({"eval_batch_size": 0}, "data.eval_batch_size=0 must be a whole number >= 1 (samples per batch)"),
    ({"num_workers": -1},
     "data.num_workers=-1 must be a whole number >= 0 (worker processes; 0 loads in the main process)"),
    ({"batch_size": 2.5}, "data.batch_size=2.5 must be a whole number >= 1 (samples per batch)"),
    ({"batch_size": "lots"}, "data.batch_size='lots' must be a whole number >= 1 (samples per batch)"),
    ({"num_workers": None},
     "data.num_workers=None must be a whole number >= 0 (worker processes; 0 loads in the main process)"),
])
def test_bad_loader_options_are_one_line(options, message):
    with pytest.raises(KdkitError) as err:
        ImageDataModule(**options)
    assert one_line(err, message) == message


def test_good_loader_options_pass():
    dm = ImageDataModule(batch_size=1, eval_batch_size=None, num_workers=0)
    assert (dm.batch_size, dm.eval_batch_size, dm.num_workers) == (1, 1, 0)
    dm = ImageDataModule(batch_size="8", eval_batch_size=16.0, num_workers=2)
    assert (dm.batch_size, dm.eval_batch_size, dm.num_workers) == (8, 16, 2)
    check_loader_options(4, teacher_batch_size=2)
    with pytest.raises(KdkitError, match="data.teacher_batch_size=0"):
        check_loader_options(4, teacher_batch_size=0)
