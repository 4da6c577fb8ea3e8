"""kdkit.errors: one line for the user, wherever the error was raised."""

import pytest
from torch.utils.data import DataLoader, Dataset

from kdkit.errors import KdkitError, unreadable


class _Broken(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        raise KdkitError("image /data/x.jpg is unreadable (truncated); replace it")


def test_an_error_from_a_loader_worker_is_still_one_line():
    loader = DataLoader(_Broken(), batch_size=2, num_workers=1)
    with pytest.raises(KdkitError) as err:
        next(iter(loader))
    assert str(err.value) == "image /data/x.jpg is unreadable (truncated); replace it"


def test_unreadable_keeps_the_first_line_of_the_cause():
    err = unreadable("/d/f.pt", "teacher checkpoint", EOFError("Ran out of input\nmore"), "replace it")
    assert str(err) == "teacher checkpoint /d/f.pt is unreadable (EOFError: Ran out of input); replace it"
