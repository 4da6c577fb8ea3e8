"""Teacher-scored batch selection: train on the most useful rows of a larger super-batch.

JEST (Evans et al. 2024, "Data curation via joint example selection further accelerates
multimodal learning") and ACID (Udandarao et al. 2024, "Active data curation effectively distils
large-scale multimodal models") score every sample of a super-batch with the learner and a
reference model and train on the top fraction. The learnability score of sample ``x`` with label
``y`` is

    s(x) = L(student; x, y) - L(teacher; x, y)

high where the student still errs but the teacher shows the sample is learnable (neither noise
nor already learnt). Here ``L`` is the cross-entropy, with the teacher's argmax as ``y`` on rows
without a label. ``disagreement`` ranks by ``KL(p_teacher || p_student)`` at temperature ``T``
instead, and ``random`` keeps a uniform random subset (the control with the same batch shapes).

On image-text pairs (the CLIP task, no class logits) ``L`` is each pair's symmetric in-batch
contrastive loss at the model's own logit scale, as in JEST, and ``disagreement`` the KL between
the teacher's and the student's image-to-text similarity distributions over the super-batch
(under DDP each rank's pairs are contrasted within its own super-batch before the scores are
gathered).

The loader gives the super-batch (``data.batch_size`` is the super-batch size); the student
trains on ``round(keep * batch)`` rows of it. The teacher's outputs on the kept rows are handed
to the distillers, so the teacher runs once per super-batch row; the student pays one extra
no-grad forward over the super-batch to score it.

Under DDP with ``scope: global`` every rank gathers the scores, so every rank ranks the same
global super-batch and takes its own share of the global top rows (rows and teacher outputs are
gathered too, one ``all_gather`` each); ``scope: local`` ranks each rank's rows alone, as a
single process would. ``rows_scored`` and ``rows_kept`` are the whole job's (summed over the
ranks before checkpoints and ``results.json``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.distributed import gather_nograd, world
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs
from kdkit.selection.base import (SelectionPolicy, StepPlan, _batch_size, _is_batched, per_sample_kl,
                                  policy_teacher, score_student, target_labels, teacher_on_rows)

SCORES = ("learnability", "disagreement", "random")
SCOPES = ("global", "local")


class BatchSelect(SelectionPolicy):
    """Keep the top ``keep`` fraction of each super-batch by a teacher-student score.

    Args:
        keep: fraction of the super-batch the student trains on, in (0, 1].
        score: "learnability" (student loss minus teacher loss, JEST/ACID), "disagreement"
            (per-sample KL from teacher to student at ``temperature``) or "random".
        temperature: softmax temperature of the disagreement score.
        teacher: the teacher that scores (None: the only one).
        scope: "global" (every DDP rank ranks the gathered scores of all ranks) or "local".
        seed: seed of the "random" score (drawn per step from ``seed`` and the global step, the
            same on every rank and after a resume).
    """

    state_keys = ("rows_scored", "rows_kept")
    rank_counters = ("rows_scored", "rows_kept")  # each DDP rank counts its own rows

    def __init__(self, keep: float = 0.5, score: str = "learnability", temperature: float = 1.0,
                 teacher: str | None = None, scope: str = "global", seed: int = 0):
        if not 0.0 < keep <= 1.0:
            raise KdkitError(f"selection.batch_select.keep={keep} must be in (0, 1]")
        if score not in SCORES:
            raise KdkitError(f"selection.batch_select.score={score!r}: one of {', '.join(SCORES)}")
        if scope not in SCOPES:
            raise KdkitError(f"selection.batch_select.scope={scope!r}: one of {', '.join(SCOPES)}")
        if temperature <= 0:
            raise KdkitError(f"selection.batch_select.temperature={temperature} must be > 0")
        self.keep, self.score, self.temperature = keep, score, temperature
        self.teacher, self.scope, self.seed = teacher, scope, seed
        self.rows_scored = self.rows_kept = 0

    def plan(self, task, plan: StepPlan) -> StepPlan:
        if plan.distill_rows is not None:
            raise KdkitError("selection.batch_select must come before policies that restrict the "
                             "distilled rows (e.g. teacher_budget) in `selection`")
        name = policy_teacher(task, self.teacher, "batch_select")
        local = _batch_size(plan.batch)
        rank, size = world() if self.scope == "global" else (0, 1)
        teacher = teacher_on_rows(task, plan, name)
        scores = self.scores(task, plan.batch, teacher, local * size, rank)
        rows = select_rows(scores, rank, local, self.keep)
        self.rows_scored += local
        self.rows_kept += len(rows)
        self._stats = {"kept_score": scores[rows].mean().detach(), "mean_score": scores.mean().detach()}
        if size == 1:
            return StepPlan(plan.batch, {**plan.teacher, name: teacher}).keep(rows)
        return gathered_plan(plan.batch, name, teacher, rows)

    def scores(self, task, batch: dict, teacher: Outputs, global_size: int, rank: int) -> Tensor:
        """Scores of the global super-batch (this rank's rows alone when not gathered), ``[N]``."""
        if self.score == "random":
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(task.global_step))
            return torch.rand(global_size, generator=g).to(batch["index"].device)
        student = score_student(task, batch)
        if teacher.logits is None:
            local = self.pair_scores(teacher, student)
        elif self.score == "learnability":
            y = target_labels(batch["label"], teacher.logits)
            local = (F.cross_entropy(student.logits.float(), y, reduction="none")
                     - F.cross_entropy(teacher.logits.float(), y, reduction="none"))
        else:
            local = per_sample_kl(teacher.logits, student.logits, self.temperature)
        return gather_nograd(local) if global_size > local.shape[0] else local

    def pair_scores(self, teacher: Outputs, student: Outputs) -> Tensor:
        """Image-text pairs (CLIP): learnability is the student's per-pair contrastive loss
        minus the teacher's (JEST's own setting); disagreement is the KL between the teacher's
        and the student's image-to-text similarity distributions over the batch (at their own
        logit scales, then ``temperature``)."""
        for out in (teacher, student):
            if out.embedding is None or "text_embedding" not in out.features:
                raise KdkitError("selection.batch_select scores class logits or image-text pairs; this "
                                 "task's outputs have neither (use score=random)")
        if self.score == "learnability":
            return pair_losses(student) - pair_losses(teacher)
        return per_sample_kl(similarities(teacher), similarities(student), self.temperature)

    def summary(self) -> dict:
        return {"score": self.score, "keep": self.keep, "rows_scored": self.rows_scored,
                "rows_kept": self.rows_kept}



def similarities(out: Outputs) -> Tensor:
    """``[B, B]`` image-to-text logits of a CLIP model's outputs at its logit scale."""
    scale = out.features.get("logit_scale")
    scale = 1.0 if scale is None else scale.float()
    return scale * out.embedding.float() @ out.features["text_embedding"].float().T


def pair_losses(out: Outputs) -> Tensor:
    """Each pair's symmetric InfoNCE loss within the batch (CLIP, Radford et al. 2021), ``[B]``:
    ``(CE(image_i -> texts, i) + CE(text_i -> images, i)) / 2``."""
    sim = similarities(out)
    target = torch.arange(sim.shape[0], device=sim.device)
    return 0.5 * (F.cross_entropy(sim, target, reduction="none") + F.cross_entropy(sim.T, target, reduction="none"))


def select_rows(scores: Tensor, rank: int, local_size: int, keep: float) -> Tensor:
    """This rank's rows, as indices into the (global) ``scores``: the top ``round(keep *
    local_size)`` per rank of the whole ranking, dealt to ranks in index order so every rank
    trains on equally many rows. Ties go to the lower index; identical on every rank."""
    per_rank = max(1, round(keep * local_size))
    ranks = scores.shape[0] // local_size
    order = torch.sort(scores.detach().float(), descending=True, stable=True).indices  # on device: no sync
    chosen = order[: per_rank * ranks].sort().values
    return chosen[rank * per_rank : (rank + 1) * per_rank]


def gathered_plan(batch: dict, name: str, teacher: Outputs, rows: Tensor) -> StepPlan:
    """The plan of ``rows`` of the global super-batch: every batched tensor and the teacher's
    outputs gathered from all ranks, then indexed."""
    new = {k: gather_nograd(v)[rows] if _is_batched(v, batch) else v for k, v in batch.items()}
    outputs = Outputs.from_flat({k: gather_nograd(v)[rows] if v.dim() else v for k, v in teacher.flat().items()})
    return StepPlan(new, {name: outputs})
