"""A training loader that continues an interrupted epoch at its next batch.

Lightning resumes a checkpoint written in the middle of an epoch (SIGTERM from a cluster,
Ctrl-C, ``callbacks.checkpoint.every_n_train_steps``) at the right step count, but a plain
``DataLoader`` starts the epoch's order again from its first batch: the resumed epoch trains
the batches it had already seen and never the ones it had not. A loader with ``state_dict`` /
``load_state_dict`` (Lightning's stateful-loader protocol) is told where it was instead.

``ResumableLoader`` records the epoch (its sampler's, set by Lightning before every epoch) and
how many batches of it the training loop had finished; resumed in that epoch, it draws the
epoch's index order as before and leaves out that many batches before loading anything. With
``num_workers=0`` the global random state, which ``kdkit.checkpointing`` restores, is the one
the next batch's augmentation would have drawn, so the resumed run equals an uninterrupted one
to the last digit. Loader worker processes keep their own random state, which no checkpoint
holds: with ``num_workers > 0`` the resumed epoch gets the same batches with other
augmentation draws.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch.utils.data import DataLoader


def sampler_epoch(loader: DataLoader) -> int | None:
    """The epoch Lightning last gave the loader's sampler (``set_epoch``), or None when none
    of its samplers counts epochs."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    for obj in (getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None), batch_sampler):
        epoch = getattr(obj, "epoch", None)
        if isinstance(epoch, int):
            return epoch
    return None


class ResumableLoader(DataLoader):
    """A ``DataLoader`` for training whose position in an epoch travels with the checkpoint.

    The state is ``{"epoch": e, "batches": k}``: epoch ``e`` had finished ``k`` batches. A
    loader given that state skips the first ``k`` batches of epoch ``e``'s order (indices only,
    nothing is loaded) and counts them as done; any other epoch starts from its first batch.
    Its length stays the epoch's full length, as Lightning's step counts expect.

    The iterator is created at the first ``next()``, not at ``iter()``: Lightning creates the
    first iterator of a resumed fit before it gives the samplers their epoch, and worker
    processes would start drawing indices from the wrong epoch's order at once.
    """

    def _position(self) -> dict:
        if "_kdkit_position" not in self.__dict__:  # no __init__: Lightning re-creates loaders by their init args
            self.__dict__["_kdkit_position"] = {"epoch": None, "batches": 0, "resume": None, "skip": 0}
        return self.__dict__["_kdkit_position"]

    def state_dict(self) -> dict[str, Any]:
        pos = self._position()
        return {"epoch": pos["epoch"], "batches": int(pos["batches"])}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._position()["resume"] = dict(state_dict)

    def trained(self, batches: int) -> None:
        """The training loop finished ``batches`` batches of the current epoch (the loader has
        handed out as many, or one more when a step was interrupted before it finished)."""
        self._position()["batches"] = int(batches)

    @property
    def _index_sampler(self):
        return _SkipFirst(super()._index_sampler, self._position())

    def __iter__(self):
        return _LazyCountingIterator(self)

    def _start_epoch(self):
        pos = self._position()
        epoch, resume = sampler_epoch(self), pos["resume"]
        pos["resume"] = None
        skip = 0
        if resume is not None and epoch is not None and resume.get("epoch") == epoch:
            skip = min(int(resume.get("batches", 0)), len(self))
        pos.update(epoch=epoch, batches=skip, skip=skip)
        if not skip:
            return DataLoader.__iter__(self)
        # A new iterator draws its workers' base seed from the global random state; the epoch's
        # iterator drew it before the checkpoint (whose state is restored), so this one must not.
        state = torch.get_rng_state()
        iterator = DataLoader.__iter__(self)
        torch.set_rng_state(state)
        return iterator


class _SkipFirst:
    """The loader's batch-index sampler without the first ``skip`` batches of its next pass."""

    def __init__(self, inner, position: dict):
        self.inner, self.position = inner, position

    def __iter__(self):
        # a generator: the skip is taken at the first next(). A worker-process iterator calls
        # iter() twice while it is built and draws from the second only.
        skip, self.position["skip"] = self.position["skip"], 0
        yield from itertools.islice(self.inner, skip, None)

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str):  # the wrapped sampler's attributes (batch_size, sampler, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class _LazyCountingIterator:
    """Creates the loader's iterator at the first ``next()`` and counts the batches it hands out."""

    def __init__(self, loader: ResumableLoader):
        self.loader, self.iterator = loader, None

    def __iter__(self):
        return self

    def __next__(self):
        if self.iterator is None:
            self.iterator = self.loader._start_epoch()
        batch = next(self.iterator)
        self.loader._position()["batches"] += 1
        return batch

    def __len__(self) -> int:
        return len(self.loader)
