"""Where a teacher's ``Outputs`` for a batch come from: the one path for teacher outputs.

Every teacher of a task is read through a ``TeacherSource``, chosen when the task is built:

- ``LiveTeacher``: the frozen teacher runs on the batch (no grad, its own precision, its taps);
- ``CachedTeacher``: outputs by sample index from a ``kdkit.cache.TeacherCache`` (static data),
  the live teacher filling the rows it misses;
- ``MemoizedTeacher``: the last outputs reused while the batch is the same one (a whole graph in
  full-batch node classification: the teacher runs once per run, not once per epoch);
- ``PrecomputedTeacher``: rows of a table computed before training (e.g. the retrieval
  teacher's embedding of every static text), looked up by the indices the batch carries.

Datamodules load data; they never run models. Tasks decide how a batch feeds a model and
hand the live source a ``forward`` callable; everything else about reuse lives here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kdkit.outputs import Outputs


class TeacherSource:
    """``outputs(batch) -> Outputs`` of one teacher; ``name`` is the teacher's name."""

    name: str

    def outputs(self, batch: dict) -> Outputs:
        raise NotImplementedError


class LiveTeacher(TeacherSource):
    """Run the teacher: ``forward(batch)`` does the no-grad, autocast forward and tapping."""

    def __init__(self, name: str, forward: Callable[[dict], Outputs]):
        self.name = name
        self.forward = forward

    def outputs(self, batch: dict) -> Outputs:
        return self.forward(batch)


class CachedTeacher(TeacherSource):
    """Outputs from ``cache`` (``lookup`` / ``store`` by ``batch["index"]``), else from ``live``."""

    def __init__(self, live: TeacherSource, cache):
        self.name = live.name
        self.live = live
        self.cache = cache

    def outputs(self, batch: dict) -> Outputs:
        device = _device_of(batch)
        cached = self.cache.lookup(batch["index"], device=device)
        if cached is not None:
            return cached
        out = self.live.outputs(batch)
        self.cache.store(batch["index"], out)
        return out


class MemoizedTeacher(TeacherSource):
    """The last ``Outputs`` again while ``key(batch)`` (a tuple of tensors) equals the last key.

    Comparing the key costs one pass over its tensors, far less than a GNN forward; a batch
    that differs in any element is a new batch.
    """

    def __init__(self, live: TeacherSource, key: Callable[[dict], tuple[Tensor, ...]]):
        self.name = live.name
        self.live = live
        self.key = key
        self._last: tuple[tuple[Tensor, ...], Outputs] | None = None

    def outputs(self, batch: dict) -> Outputs:
        key = self.key(batch)
        if self._last is not None and all(_same(a, b) for a, b in zip(self._last[0], key, strict=True)):
            return self._last[1]
        out = self.live.outputs(batch)
        self._last = (key, out)
        return out


class PrecomputedTeacher(TeacherSource):
    """Rows of precomputed tensors addressed by indices in the batch.

    Args:
        name: the teacher's name.
        table: ``[N, ...]`` teacher outputs of every addressable sample.
        lookup: ``(table, batch) -> Outputs | None``; None when the batch carries no indices
            into the table, and then ``fallback`` (a live source, or None) answers.
    """

    def __init__(self, name: str, table: Tensor, lookup: Callable[[Tensor, dict], Outputs | None],
                 fallback: TeacherSource | None = None):
        self.name = name
        self.table = table
        self.lookup = lookup
        self.fallback = fallback

    def outputs(self, batch: dict) -> Outputs:
        device = _device_of(batch)
        if device is not None and self.table.device != device:
            self.table = self.table.to(device)
        out = self.lookup(self.table, batch)
        if out is not None:
            return out
        if self.fallback is None:
            from kdkit.errors import KdkitError

            raise KdkitError(f"teacher '{self.name}': the batch carries no rows of its precomputed "
                             "table and the teacher cannot run live on it")
        return self.fallback.outputs(batch)


def _same(a: Tensor, b: Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.device == b.device and bool(torch.equal(a, b)))


def _device_of(batch: dict):
    for value in batch.values():
        if isinstance(value, Tensor):
            return value.device
    return None
