"""Disagreement-driven augmentation: of K random crop+flip candidates, train on the hardest.

Worst-of-K augmentation (Engstrom et al. 2019, "Exploring the landscape of spatial robustness")
with the teacher-student divergence as the criterion: for each batch, draw K candidate
augmentations ``a_1..a_K`` of every image (the standard CIFAR random crop with zero padding and
horizontal flip), and train on

    a* = argmax_k  D( p_teacher(a_k(x)) || p_student(a_k(x)) )

per sample (``per: sample``) or for the whole batch (``per: batch``, the mean divergence), with
``D`` the KL divergence or the Jensen-Shannon divergence. This is the simple relative of HARD
(Nix et al. 2023, "HARD: Hard Augmentations for Robust Distillation"), which *learns* an
augmentation model that maximises the same disagreement; that learned relative is
``kdkit.selection.learned_augment`` (``selection=[learned_augment]``).

The policy augments itself, so it needs the loader's images un-augmented (``data.augment=false``).
Every candidate gets a live teacher forward (a teacher cache holds outputs of the plain images
only) and a no-grad student forward: K times the teacher cost of plain KD. The chosen
candidate's teacher outputs go to the distillers, so the teacher never runs a (K+1)-th time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdkit.distributed import world
from kdkit.errors import KdkitError
from kdkit.selection.base import (SelectionPolicy, StepPlan, _is_batched, per_sample_js, per_sample_kl, policy_teacher,
                                  score_student)

PER = ("sample", "batch")
DIVERGENCES = ("kl", "js")


class AugmentSelect(SelectionPolicy):
    """Train on the crop+flip candidate (of ``candidates``) with the largest teacher-student
    divergence; see the module docstring.

    Args:
        candidates: K, the random augmentations drawn per image (1 = plain random crop+flip).
        per: "sample" (each image its own argmax) or "batch" (one candidate index for the batch,
            by mean divergence).
        divergence: "kl" (KL(teacher || student)) or "js" (Jensen-Shannon).
        temperature: softmax temperature of the divergence.
        padding: zero padding of the random crop, in pixels (4 on CIFAR).
        flip: also flip horizontally with probability 1/2.
        teacher: the teacher that scores (None: the only one).
        seed: seed of the candidates (per step: seed, global step and DDP rank).
    """

    state_keys = ("teacher_forwards",)
    rank_counters = ("teacher_forwards",)  # each DDP rank counts its own rows

    def __init__(self, candidates: int = 4, per: str = "sample", divergence: str = "kl",
                 temperature: float = 1.0, padding: int = 4, flip: bool = True, teacher: str | None = None,
                 seed: int = 0):
        if candidates < 1:
            raise KdkitError(f"selection.augment_select.candidates={candidates} must be >= 1")
        if per not in PER:
            raise KdkitError(f"selection.augment_select.per={per!r}: one of {', '.join(PER)}")
        if divergence not in DIVERGENCES:
            raise KdkitError(f"selection.augment_select.divergence={divergence!r}: one of {', '.join(DIVERGENCES)}")
        if padding < 0 or temperature <= 0:
            raise KdkitError(f"selection.augment_select: padding={padding} must be >= 0 and "
                             f"temperature={temperature} > 0")
        self.candidates, self.per, self.divergence = candidates, per, divergence
        self.temperature, self.padding, self.flip = temperature, padding, flip
        self.teacher, self.seed = teacher, seed
        self.teacher_forwards = 0

    def check_data(self, datamodule) -> None:
        if getattr(datamodule, "augment", False) or getattr(datamodule, "mixes_samples", False):
            raise KdkitError("selection.augment_select draws its own crop+flip candidates from plain "
                             "images: set data.augment=false (and no randaugment_ops, random_erasing, "
                             "mixup_alpha or cutmix_alpha)")

    def plan(self, task, plan: StepPlan) -> StepPlan:
        if plan.distill_rows is not None or plan.teacher:
            raise KdkitError("selection.augment_select must come first in `selection`: it replaces the "
                             "images, so earlier teacher outputs would not match them")
        name = policy_teacher(task, self.teacher, "augment_select")
        images = plan.batch["image"]
        k, b = self.candidates, images.shape[0]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(task.global_step) * 997 + world()[0])
        flat = draw_candidates(images, k, self.padding, self.flip, g).flatten(0, 1)  # [K*B, C, H, W]
        expanded = {key: v.repeat(k, *[1] * (v.dim() - 1)) if _is_batched(v, plan.batch) else v
                    for key, v in plan.batch.items()}
        expanded["image"] = flat
        teacher = task.run_teacher(name, expanded)  # live: a cache knows the plain images only
        student = score_student(task, expanded)
        self.teacher_forwards += k * b
        div = divergence(teacher.logits, student.logits, self.divergence, self.temperature).view(k, b)
        pick = choose(div, self.per)
        rows = pick * b + torch.arange(b, device=pick.device)  # candidate pick[i] of image i
        self._stats = {"chosen_divergence": div.gather(0, pick[None]).mean().detach(),
                       "mean_divergence": div.mean().detach()}
        batch = {**plan.batch, "image": flat[rows]}
        return StepPlan(batch, {name: teacher.rows(rows)})

    def summary(self) -> dict:
        return {"candidates": self.candidates, "per": self.per, "divergence": self.divergence,
                "teacher_forwards": self.teacher_forwards}



def draw_candidates(images: Tensor, k: int, padding: int, flip: bool, generator: torch.Generator) -> Tensor:
    """``k`` random crop(+flip) augmentations of every image, ``[k, B, C, H, W]``: the image
    zero-padded by ``padding`` on each side, an ``H x W`` window at a uniform random offset, then
    mirrored left-right with probability 1/2 when ``flip``. Offsets come from ``generator``."""
    b, _, h, w = images.shape
    dy = torch.randint(0, 2 * padding + 1, (k, b), generator=generator).to(images.device)
    dx = torch.randint(0, 2 * padding + 1, (k, b), generator=generator).to(images.device)
    mirror = (torch.rand(k, b, generator=generator) < 0.5).to(images.device) if flip else \
        torch.zeros(k, b, dtype=torch.bool, device=images.device)
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    ys = dy[..., None] + torch.arange(h, device=images.device)  # [k, B, H]
    cols = torch.arange(w, device=images.device)
    xs = dx[..., None] + torch.where(mirror[..., None], w - 1 - cols, cols)  # [k, B, W]
    sample = torch.arange(b, device=images.device)[None, :, None, None].expand(k, b, h, w)
    out = padded[sample, :, ys[..., :, None].expand(k, b, h, w), xs[..., None, :].expand(k, b, h, w)]
    return out.permute(0, 1, 4, 2, 3).contiguous()  # advanced indexing put channels last


def divergence(teacher_logits: Tensor, student_logits: Tensor, kind: str, temperature: float) -> Tensor:
    """Per-row KL(teacher || student) or Jensen-Shannon divergence at ``temperature``."""
    if kind == "kl":
        return per_sample_kl(teacher_logits, student_logits, temperature)
    return per_sample_js(teacher_logits, student_logits, temperature)


def choose(div: Tensor, per: str) -> Tensor:
    """The chosen candidate of each image, ``[B]``, from divergences ``[K, B]``: the per-image
    argmax, or one argmax of the batch mean for every image. Ties go to the lower candidate."""
    if per == "sample":
        return div.argmax(0)
    return div.mean(1).argmax().expand(div.shape[1]).clone()
