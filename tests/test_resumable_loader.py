"""kdkit.resumable_loader: a training loader resumed in the middle of an epoch continues at its
next batch, in the epoch's own order, with the random draws an uninterrupted loader makes."""

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from kdkit.checkpointing import rng_state, set_rng_state
from kdkit.datamodules.length_grouping import LengthGroupedBatchSampler
from kdkit.resumable_loader import ResumableLoader, sampler_epoch
from kdkit.sampling import EpochShuffleSampler

DATA = TensorDataset(torch.arange(22))  # 5 batches of 4, the remainder dropped


def loader(num_workers: int = 0, data=DATA) -> ResumableLoader:
    return ResumableLoader(data, batch_size=4, sampler=EpochShuffleSampler(data, seed=3), drop_last=True,
                           num_workers=num_workers, persistent_workers=num_workers > 0)


def epoch_of(dl, epoch: int, iterator=None) -> list[list[int]]:
    it = iter(dl) if iterator is None else iterator
    dl.sampler.set_epoch(epoch)  # after iter(), as Lightning does when it resumes a fit
    return [batch[0].tolist() for batch in it]


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_resumed_after_two_batches_serves_the_other_three(workers):
    straight = loader()
    epochs = {e: epoch_of(straight, e) for e in (2, 3)}
    assert epochs[2] != epochs[3] and len(epochs[2]) == 5

    interrupted = loader()
    interrupted.sampler.set_epoch(2)
    it = iter(interrupted)
    seen = [next(it)[0].tolist() for _ in range(2)]
    interrupted.trained(2)  # the loop finished both (StageCheckpoint says so before it saves)
    state = interrupted.state_dict()
    assert state == {"epoch": 2, "batches": 2}

    resumed = loader(workers)
    resumed.load_state_dict(state)
    it = iter(resumed)  # Lightning creates the iterator before it sets the sampler's epoch
    rest = epoch_of(resumed, 2, it)
    assert seen + rest == epochs[2]  # no batch twice, none left out, the epoch's own order
    assert len(resumed) == 5  # the epoch's full length: Lightning counts the skipped batches as done
    assert resumed.state_dict() == {"epoch": 2, "batches": 5}
    assert epoch_of(resumed, 3) == epochs[3]  # the next epoch from its first batch


def test_a_state_saved_at_an_epoch_end_skips_nothing_in_the_next_epoch():
    """With a train-batch limit the epoch ends before the loader is exhausted: its state (epoch
    2, 3 batches) must not cut epoch 3 short."""
    resumed = loader()
    resumed.load_state_dict({"epoch": 2, "batches": 3})
    assert epoch_of(resumed, 3) == epoch_of(loader(), 3)


def test_a_step_interrupted_midway_is_trained_again():
    """Ctrl-C in the middle of batch 3's step: three batches handed out, two finished; the
    resumed epoch starts at batch 3."""
    straight = epoch_of(loader(), 1)
    interrupted = loader()
    interrupted.sampler.set_epoch(1)
    it = iter(interrupted)
    for _ in range(3):
        next(it)
    assert interrupted.state_dict()["batches"] == 3
    interrupted.trained(2)
    resumed = loader()
    resumed.load_state_dict(interrupted.state_dict())
    assert epoch_of(resumed, 1) == straight[2:]


class Augmented(Dataset):
    """Each sample draws from the global random state when loaded, as a random crop does."""

    def __len__(self):
        return 22

    def __getitem__(self, i):
        return torch.tensor([float(i)]) + torch.rand(1)


def test_with_the_random_state_restored_the_resumed_batches_are_the_same_tensors():
    torch.manual_seed(0)
    straight = loader(data=Augmented())
    straight.sampler.set_epoch(4)
    reference = [batch.clone() for batch in straight]

    torch.manual_seed(0)
    run = loader(data=Augmented())
    run.sampler.set_epoch(4)
    it = iter(run)
    first = [next(it) for _ in range(3)]
    run.trained(3)
    state, rng = run.state_dict(), rng_state()  # what a checkpoint holds
    torch.manual_seed(123)  # a new process: another random state until the checkpoint's is restored

    set_rng_state(rng)
    resumed = loader(data=Augmented())
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(4)
    rest = list(resumed)
    assert torch.equal(torch.cat(first + rest), torch.cat(reference))


def test_a_batch_sampler_that_counts_epochs_is_resumed_too():
    """Length-grouped batches (retrieval data) come from a batch sampler with its own epoch."""
    lengths = [i % 7 for i in range(22)]

    def grouped():
        order = EpochShuffleSampler(DATA, seed=1)
        return ResumableLoader(DATA, batch_sampler=LengthGroupedBatchSampler(order, 4, drop_last=True,
                                                                             lengths=lengths, seed=1))

    def epoch(dl, e):
        dl.batch_sampler.set_epoch(e)
        return [b[0].tolist() for b in dl]

    straight = epoch(grouped(), 2)
    resumed = grouped()
    resumed.load_state_dict({"epoch": 2, "batches": 1})
    assert sampler_epoch(resumed) == 0
    assert epoch(resumed, 2) == straight[1:]
