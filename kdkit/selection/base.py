"""The contract of data-selection policies: what the student trains on, chosen with the teacher.

Distillers change the loss; selection policies change what the student sees and which samples get
teacher outputs. Every training step the task builds a ``StepPlan`` (the loader's batch, no teacher
outputs yet, every row distilled) and hands it to each policy in turn (``selection=[...]``, in
config order); the task then trains on the final plan:

- ``plan.batch``: the rows the student trains on (a policy may keep some rows of a super-batch, or
  replace the images by another augmentation);
- ``plan.teacher``: teacher outputs a policy already computed (name -> ``Outputs``), one row per
  distilled row (``distill_rows``, in that order; every row of ``plan.batch`` when None), so the
  teacher never runs twice on one batch;
- ``plan.distill_rows``: the rows of ``plan.batch`` the distillers see (None: all), e.g. only the
  samples a teacher budget paid for. The task loss always sees every labelled row.

A policy is one file under ``kdkit/selection/`` and one yaml under ``conf/selection/``; it may
also act at the start of each training epoch (``on_epoch_start``, e.g. to spend a teacher budget)
and report facts for ``results.json`` (``summary``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.distributed import sum_over_ranks
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs


@dataclass
class StepPlan:
    """One training step's data: see the module docstring."""

    batch: dict
    teacher: dict[str, Outputs] = field(default_factory=dict)
    distill_rows: Tensor | None = None

    def keep(self, rows: Tensor) -> StepPlan:
        """The plan restricted to ``rows`` (long indices into ``batch``, in the order wanted):
        batch, teacher outputs and distilled rows alike."""
        batch = {k: v[rows] if _is_batched(v, self.batch) else v for k, v in self.batch.items()}
        if self.distill_rows is None:
            return StepPlan(batch, {name: out.rows(rows) for name, out in self.teacher.items()})
        position = torch.full((_batch_size(self.batch),), -1, dtype=torch.long, device=rows.device)
        position[rows] = torch.arange(len(rows), device=rows.device)
        mapped = position[self.distill_rows.to(rows.device)]
        kept = mapped >= 0  # distilled rows that survive, in the teacher outputs' order
        return StepPlan(batch, {name: out.rows(kept) for name, out in self.teacher.items()}, mapped[kept])

    def distilled_batch(self) -> dict:
        """``batch`` restricted to ``distill_rows`` (the batch itself when None)."""
        if self.distill_rows is None:
            return self.batch
        return {k: v[self.distill_rows] if _is_batched(v, self.batch) else v for k, v in self.batch.items()}


class SelectionPolicy:
    """Base class of the policies (``selection=[<name>, ...]``).

    ``plan`` is called every training step with the ``kdkit.tasks.base.DistillationTask``
    (``task.teacher_outputs(batch, name)``, ``task.student_outputs(batch)``,
    ``task.teacher_names``) and returns the new plan. ``teacher`` names the teacher the policy
    reads (None: the only one).
    """

    teacher: str | None = None
    state_keys: tuple[str, ...] = ()  # attributes a resumed run needs (saved in checkpoints)
    # integer counts each DDP rank keeps of its own rows (e.g. teacher forwards); summed over the
    # ranks before a checkpoint is saved and before ``summary``, so both hold the global count
    rank_counters: tuple[str, ...] = ()
    _stats: dict = {}  # this step's values for the logs (``step_stats``), set by ``plan``

    def plan(self, task, plan: StepPlan) -> StepPlan:
        return plan

    def check_data(self, datamodule) -> None:
        """Raise KdkitError when the policy cannot work on ``datamodule`` (checked before any
        model trains, like the task's own ``check_data``)."""

    def on_epoch_start(self, task) -> None:
        """Work done once per training epoch before its first step (e.g. spending a budget)."""

    def summary(self) -> dict:
        """Facts about the fit for ``results.json`` (e.g. teacher forwards spent)."""
        return {}

    def step_stats(self) -> dict[str, Tensor | float]:
        """Values logged as ``train/selection/<policy>/<key>`` on logging steps."""
        return dict(self._stats)

    def state_dict(self) -> dict:
        """What a resumed run needs to continue the policy (saved in Lightning checkpoints)."""
        return {key: getattr(self, key) for key in self.state_keys}

    def load_state_dict(self, state: dict) -> None:
        for key in self.state_keys:
            setattr(self, key, state[key])

    def sync_counters(self) -> None:
        """Make every ``rank_counters`` count global: add what all ranks counted since the last
        sync (one ``all_reduce``; a no-op in one process). Collective: the task calls it on every
        rank when a checkpoint is saved and before the end-of-fit summary."""
        if not self.rank_counters:
            return
        synced = self.__dict__.setdefault("_synced", {})
        since = [getattr(self, k) - synced.get(k, 0) for k in self.rank_counters]
        for key, added in zip(self.rank_counters, sum_over_ranks(since)):
            setattr(self, key, synced.get(key, 0) + added)
            synced[key] = getattr(self, key)

    def counters_loaded(self) -> None:
        """The counts just loaded from a checkpoint are global already (saved after a sync)."""
        self.__dict__["_synced"] = {k: getattr(self, k) for k in self.rank_counters}


def policy_teacher(task, name: str | None, policy: str) -> str:
    """The teacher a policy reads: ``name``, or the only teacher when None."""
    names = task.teacher_names
    if name is None:
        if len(names) != 1:
            raise KdkitError(f"selection.{policy}.teacher is null but this run has teachers {names}: "
                             f"name the one the policy reads")
        return names[0]
    if name not in names:
        raise KdkitError(f"selection.{policy}.teacher={name!r} is not a teacher of this run ({', '.join(names)})")
    return name


def teacher_on_rows(task, plan: StepPlan, name: str) -> Outputs:
    """Teacher ``name``'s outputs on every row of ``plan.batch``: reused from the plan when a
    policy already computed them for all rows, otherwise one forward (or cache lookup)."""
    if name in plan.teacher and plan.distill_rows is None:
        return plan.teacher[name]
    return task.teacher_outputs(plan.batch, name)


def target_labels(labels: Tensor, teacher_logits: Tensor) -> Tensor:
    """The label of each row, or the teacher's argmax where there is none (transfer rows); soft
    labels ``[B, C]`` (Mixup / CutMix) as they are, a target ``cross_entropy`` takes too."""
    from kdkit.labels import labeled

    if labels.dim() == 2:
        return labels
    return torch.where(labeled(labels), labels, teacher_logits.argmax(-1))


@contextmanager
def buffers_kept(model: torch.nn.Module):
    """Run a scoring forward without touching ``model``'s buffers (BatchNorm running
    statistics): a policy's extra student forwards must not count as training batches."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def score_student(task, batch: dict) -> Outputs:
    """The student's outputs on ``batch`` for scoring: no grad, buffers untouched, train mode
    (what the next training step would see)."""
    with torch.no_grad(), buffers_kept(task.student):
        return task.student_outputs(batch)


def per_sample_kl(teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``KL(softmax(t/T) || softmax(s/T))`` per row, ``[B]``: the teacher-student divergence."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1)


def per_sample_js(a_logits: Tensor, b_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Jensen-Shannon divergence of ``softmax(a/T)`` and ``softmax(b/T)`` per row, ``[B]``
    (symmetric, bounded by log 2)."""
    p = (a_logits.float() / temperature).softmax(-1)
    q = (b_logits.float() / temperature).softmax(-1)
    log_m = (0.5 * (p + q)).clamp_min(1e-12).log()
    kl = lambda x: (x * (x.clamp_min(1e-12).log() - log_m)).sum(-1)
    return 0.5 * kl(p) + 0.5 * kl(q)


def _batch_size(batch: dict) -> int:
    for value in batch.values():
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("the batch holds no batched tensor")


def _is_batched(value, batch: dict) -> bool:
    return isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == _batch_size(batch)
