"""A budget of teacher queries: only a fraction of the training samples ever get a teacher forward.

Robust active distillation (Baykal et al. 2023, "Robust Active Distillation") and the
active-learning view of KD: the teacher is the expensive oracle, so a budget ``B = fraction * N``
of the ``N`` training samples may be queried, chosen in ``rounds`` at evenly spaced epoch starts.
Each round buys ``B / rounds`` more samples, never one twice:

- ``random``: a uniform random subset (the control);
- ``uncertainty``: the student's smallest margin ``p_(1) - p_(2)`` between its two most likely
  classes first (margin sampling, Scheffer et al. 2001);
- ``view_disagreement``: the student's largest Jensen-Shannon divergence between an image and
  its mirror image first, a teacher-free proxy for where the student is unstable.

Ranking by the teacher-student disagreement itself would need the teacher on every sample, which
is what the budget forbids; both scores read the student only, in eval mode, on the un-augmented
pool (``datamodule.plain_train_view``). The first of several rounds is spent at random (the
student has learnt nothing to rank by yet), as active learning starts from a random seed set.

Each step the distillers see only the batch rows already bought; the task loss still sees every
labelled row. ``teacher_forwards`` counts the rows handed to the teacher (every step's bought
rows: bought samples are distilled every epoch, augmented like the rest of the batch).

Under DDP the ranks share the scoring pass (each scores every W-th sample, the scores are
gathered), so every rank buys the same samples, and ``teacher_forwards`` is summed over the
ranks before checkpoints and the summary: the figure is the whole job's teacher rows.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from kdkit.distributed import gather_nograd, world
from kdkit.errors import KdkitError
from kdkit.selection.base import SelectionPolicy, StepPlan, per_sample_js, policy_teacher

ORDERS = ("random", "uncertainty", "view_disagreement")


class TeacherBudget(SelectionPolicy):
    """Distil only the samples a teacher budget paid for; see the module docstring.

    Args:
        fraction: the budget, as a fraction of the training samples, in (0, 1].
        order: which samples are bought first: "random", "uncertainty" or "view_disagreement".
        rounds: how many times the budget is topped up (at evenly spaced epoch starts).
        scoring_batch_size: batch size of the student's scoring pass over the pool.
        teacher: the teacher whose queries are budgeted (None: the only one).
        seed: seed of the random choices (identical on every DDP rank).
    """

    state_keys = ("bought", "rounds_done", "teacher_forwards")
    rank_counters = ("teacher_forwards",)  # each DDP rank counts its own rows

    def __init__(self, fraction: float = 0.3, order: str = "random", rounds: int = 3,
                 scoring_batch_size: int = 512, teacher: str | None = None, seed: int = 0):
        if not 0.0 < fraction <= 1.0:
            raise KdkitError(f"selection.teacher_budget.fraction={fraction} must be in (0, 1]")
        if order not in ORDERS:
            raise KdkitError(f"selection.teacher_budget.order={order!r}: one of {', '.join(ORDERS)}")
        if rounds < 1 or scoring_batch_size < 1:
            raise KdkitError(f"selection.teacher_budget: rounds={rounds} and scoring_batch_size="
                             f"{scoring_batch_size} must be >= 1")
        self.fraction, self.order, self.rounds = fraction, order, rounds
        self.scoring_batch_size, self.teacher, self.seed = scoring_batch_size, teacher, seed
        self.bought: Tensor | None = None  # bool [N]: samples the budget paid for
        self.rounds_done = 0
        self.teacher_forwards = 0

    def check_data(self, datamodule) -> None:
        if getattr(datamodule, "mixes_samples", False):
            raise KdkitError("selection.teacher_budget buys teacher outputs per sample, but with "
                             "data.mixup_alpha / cutmix_alpha a training row mixes two samples: "
                             "switch the mixing off")

    # ---- buying --------------------------------------------------------------------------------
    def on_epoch_start(self, task) -> None:
        trainer = task.trainer
        epochs = max(1, int(trainer.max_epochs or 1))
        pool = getattr(trainer.datamodule, "plain_train_view", None)
        if pool is None:
            raise KdkitError("selection.teacher_budget needs a datamodule with plain_train_view (the "
                             f"un-augmented training samples); {type(trainer.datamodule).__name__} has none")
        if self.bought is None or len(self.bought) != len(pool):
            self.bought = torch.zeros(len(pool), dtype=torch.bool)
            self.rounds_done = 0
        due = lambda: round_epoch(self.rounds_done, self.rounds, epochs) <= task.current_epoch  # noqa: E731
        while self.rounds_done < self.rounds and due():  # a resumed run catches up on missed rounds
            self.buy(task, pool)

    def buy(self, task, pool) -> None:
        """Spend round ``rounds_done``'s share of the budget on the pool's best-ranked samples."""
        r = self.rounds_done
        target = round(self.fraction * len(pool) * (r + 1) / self.rounds)
        wanted = target - int(self.bought.sum())
        if wanted > 0:
            scores = self.scores(task, pool, first_round=r == 0)
            scores[self.bought] = float("-inf")
            order = torch.sort(scores, descending=True, stable=True).indices
            self.bought[order[:wanted]] = True
        self.rounds_done += 1

    def scores(self, task, pool, first_round: bool) -> Tensor:
        """Higher first: the pool's ranking for this round, ``[N]`` (CPU)."""
        if self.order == "random" or (first_round and self.rounds > 1):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rounds_done)
            return torch.rand(len(pool), generator=g)
        return pool_scores(task, pool, self.order, self.scoring_batch_size)

    # ---- every step ------------------------------------------------------------------------------
    def plan(self, task, plan: StepPlan) -> StepPlan:
        if self.bought is None:
            raise KdkitError("selection.teacher_budget has bought nothing: it needs a Lightning fit "
                             "(the budget is spent at epoch starts)")
        name = policy_teacher(task, self.teacher, "teacher_budget")
        index = plan.batch["index"]
        paid = self.bought.to(index.device)[index]
        if plan.distill_rows is not None:  # only rows an earlier policy distils, and paid
            rows = plan.distill_rows[paid[plan.distill_rows]]
            keep = paid[plan.distill_rows]
        else:
            rows = paid.nonzero().flatten()
            keep = paid
        teacher = {n: out.rows(keep) for n, out in plan.teacher.items()}
        self.teacher_forwards += len(rows) if name not in plan.teacher else 0
        self._stats = {"distilled_rows": float(len(rows))}  # a host number: logging it needs no device sync
        return StepPlan(plan.batch, teacher, rows)

    # ---- reports ---------------------------------------------------------------------------------
    def summary(self) -> dict:
        return {"fraction": self.fraction, "order": self.order,
                "samples_bought": int(self.bought.sum()) if self.bought is not None else 0,
                "teacher_forwards": self.teacher_forwards}



def round_epoch(r: int, rounds: int, epochs: int) -> int:
    """The epoch at whose start round ``r`` of ``rounds`` is spent, evenly over ``epochs``."""
    return (r * epochs) // rounds


@torch.no_grad()
def pool_scores(task, pool, order: str, batch_size: int) -> Tensor:
    """The student's ranking score of every pool sample (eval mode, no grad), ``[N]`` on CPU:
    minus the top-2 margin ("uncertainty") or the image-vs-mirror JS divergence.

    Under DDP rank ``r`` scores the samples ``r, r + W, ...`` and the ranks gather the scores: the
    pool is scored once in all (not once per rank), and every rank ranks the very same numbers,
    so every rank buys the same samples even where its kernels are not bit-exact."""
    rank, size = world()
    shard = Subset(pool, range(rank, len(pool), size)) if size > 1 else pool
    scores = shard_scores(task, shard, order, batch_size)
    if size == 1:
        return scores.cpu()
    longest = -(-len(pool) // size)  # shards differ by one sample at most: pad to gather
    padded = torch.full((longest,), float("nan"), device=scores.device)
    padded[: len(scores)] = scores
    everyone = gather_nograd(padded).view(size, longest)
    return everyone.t().reshape(-1)[: len(pool)].cpu()  # sample r + W * j sits at [r, j]


def shard_scores(task, pool, order: str, batch_size: int) -> Tensor:
    """``pool_scores`` of the samples of ``pool`` in order, on the task's device."""
    student = task.student
    was_training = student.training
    student.eval()
    try:
        out = []
        for batch in DataLoader(pool, batch_size=batch_size, shuffle=False):
            batch = {k: v.to(task.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            logits = task.student_outputs(batch).logits.float()
            if order == "uncertainty":
                top2 = logits.softmax(-1).topk(2, dim=-1).values
                out.append(top2[:, 1] - top2[:, 0])
            else:
                mirror = task.student_outputs({**batch, "image": batch["image"].flip(-1)}).logits
                out.append(per_sample_js(logits, mirror))
        return torch.cat(out)
    finally:
        student.train(was_training)
