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


@pytest.mark.parametrize("env,zero", [
    ({}, True),
    ({"RANK": "0", "LOCAL_RANK": "0", "NODE_RANK": "0"}, True),
    ({"LOCAL_RANK": "1"}, False),                       # a rank Lightning's DDP relaunched
    ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False),     # the first rank of the second node
    ({"RANK": "3"}, False),                             # torchrun
    ({"SLURM_PROCID": "2"}, False),                     # srun, before Lightning sets the rest
    ({"SLURM_PROCID": "0", "LOCAL_RANK": "1"}, False),  # relaunched inside a one-task SLURM job
])
def test_rank_zero_is_read_from_every_launchers_variables(monkeypatch, capsys, env, zero):
    from kdkit.errors import RANK_VARIABLES, launched_as_rank_zero, say

    for key in RANK_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert launched_as_rank_zero() is zero
    say("hello")
    assert ("kdkit: hello" in capsys.readouterr().err) is zero  # say speaks on rank 0 alone
