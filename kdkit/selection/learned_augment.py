"""Learned adversarial augmentation: a small spatial transformer trained to make teacher and student disagree.

HARD (Nix, Burg & Sinz 2023, "HARD: Hard Augmentations for Robust Distillation", arXiv 2305.14890)
learns an augmentation model that generates samples on which teacher and student disagree, while
the student distils from the teacher on those samples. HARD's paper body could not be read here;
its learned spatial augmentation is reproduced from the abstract's description and TeachAugment's
teacher-consistency term (Suzuki 2022, "TeachAugment: Data Augmentation Optimization Using
Teacher Knowledge", arXiv 2202.12513); this is not HARD's code or exact objective.

The augmentor ``a_phi`` (``AffineAugmentor``) reads an image ``x`` and a noise vector
``z ~ N(0, I)`` and predicts one affine transform per image:

    Delta = a_phi(x, z)                                   (a 2x3 offset per image)
    theta = I + strength * tanh(Delta)                    (|theta - I| <= strength elementwise)
    x_hat = grid_sample(x, affine_grid(theta))            (bilinear, zero padding)

Its last layer starts at zero, so at the start ``x_hat == x``. Every training step it takes one
Adam step on

    L_aug = - mean_i KL(T(x_hat_i)/tau || S(x_hat_i)/tau) + lam * mean_i KL(T(x_i) || T(x_hat_i))

(``T``, ``S``: teacher and student logits, ``tau``: ``temperature``, ``lam``: ``consistency``):
gradient *ascent* on the teacher-student disagreement on the generated images, held back by
TeachAugment's term that keeps the teacher's prediction on ``x_hat`` close to its prediction on
``x`` (so the augmentor cannot win by destroying the image). The gradient reaches ``phi`` alone
(``torch.autograd.grad``): the student's and the teacher's ``.grad`` are never written, the
student's BatchNorm statistics are restored after its forward, and the teacher (frozen, eval
mode) runs with autograd only so that the gradient reaches ``x_hat`` through it. At the
identity every sample point sits on a pixel centre, where bilinear sampling has one-sided
gradients, so the very first step may not raise the disagreement; the steps after it do.

The student then trains on the batch with a ``fraction`` of its rows (the first
``round(fraction * B)`` of a permutation seeded by ``seed``, the global step and the DDP rank)
replaced by their ``x_hat``, computed *before* the augmentor's update and detached. Teacher
outputs are handed to the distillers and never recomputed: ``T(x_hat)`` (detached) for the
augmented rows, ``T(x)`` for the others. Cost per step: 2B teacher rows (B on ``x_hat``, live,
with autograd; B on ``x`` without, from the task's teacher source, so a teacher cache serves them
when the loader's images are static), counted in ``teacher_forwards``; one extra student forward
and a backward through both models to the images.

Under DDP every rank draws its own noise and rows, and the augmentor's gradients are averaged over
the ranks (``all_reduce``) before its step; its weights start from a seeded generator, so every
rank keeps the same augmentor. The augmentor is built on the first step (on the images' device,
for their channel count); its weights, its optimizer's state and ``teacher_forwards`` (summed over the
ranks) travel in checkpoints.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.distributed import world
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs
from kdkit.selection.base import (
    SelectionPolicy,
    StepPlan,
    _batch_size,
    buffers_kept,
    per_sample_kl,
    policy_teacher,
)


def affine_theta(delta: Tensor, strength: float) -> Tensor:
    """``I + strength * tanh(delta)``: ``[B, 2, 3]`` affine matrices within ``strength`` of the
    identity, elementwise, for any offset ``delta`` (``[B, 6]`` or ``[B, 2, 3]``)."""
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=delta.dtype, device=delta.device)
    return identity + strength * torch.tanh(delta.reshape(-1, 2, 3))


def warp(images: Tensor, theta: Tensor) -> Tensor:
    """``images`` resampled through the affine maps ``theta`` (bilinear, zeros outside)."""
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class AffineAugmentor(nn.Module):
    """``a_phi``: two stride-2 convolutions (``width`` channels), global average pooling, the
    noise ``z`` appended, and a zero-initialised Linear to the 6 entries of ``Delta``.

    Args:
        in_channels: channels of the images.
        width: channels of the convolutions.
        noise_dim: size of ``z``.
        strength: bound of ``|theta - I|`` (``theta = I + strength * tanh(Delta)``).
        generator: draws the convolutions' initial weights (so every DDP rank starts alike).
    """

    def __init__(self, in_channels: int, width: int = 16, noise_dim: int = 8, strength: float = 0.5,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.noise_dim, self.strength = noise_dim, strength
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.head = nn.Linear(width + noise_dim, 6)
        for conv in (self.conv1, self.conv2):  # PyTorch's default init, from ``generator``
            nn.init.kaiming_uniform_(conv.weight, a=math.sqrt(5), generator=generator)
            bound = 1 / math.sqrt(conv.weight[0].numel())
            nn.init.uniform_(conv.bias, -bound, bound, generator=generator)
        nn.init.zeros_(self.head.weight)  # start at the identity transform
        nn.init.zeros_(self.head.bias)

    def theta(self, images: Tensor, noise: Tensor) -> Tensor:
        h = F.relu(self.conv1(images))
        h = F.relu(self.conv2(h)).mean((2, 3))
        return affine_theta(self.head(torch.cat([h, noise], 1)), self.strength)

    def forward(self, images: Tensor, noise: Tensor) -> Tensor:
        """``x_hat`` for ``images`` ``[B, C, H, W]`` and ``noise`` ``[B, noise_dim]``."""
        return warp(images, self.theta(images, noise))


class LearnedAugment(SelectionPolicy):
    """Train on images warped by a learned augmentor that maximises teacher-student disagreement
    (HARD-style, with TeachAugment's teacher-consistency term); see the module docstring.

    Args:
        fraction: share of each batch's rows replaced by their augmented version, in (0, 1].
        strength: bound of ``|theta - I|`` per entry of the affine matrix (> 0).
        lr: Adam learning rate of the augmentor (> 0).
        temperature: softmax temperature ``tau`` of the disagreement term (> 0).
        consistency: weight ``lam`` of ``KL(T(x) || T(x_hat))`` in the augmentor's loss (>= 0).
        width: channels of the augmentor's convolutions.
        noise_dim: size of the noise vector ``z``.
        teacher: the teacher the augmentor plays against (None: the only one).
        seed: seed of the augmentor's initial weights, and (with the global step and the DDP rank)
            of each step's noise and augmented rows.
    """

    rank_counters = ("teacher_forwards",)  # each DDP rank counts its own rows
    name = "learned_augment"  # the config name, in messages

    def __init__(self, fraction: float = 0.5, strength: float = 0.5, lr: float = 1e-3, temperature: float = 1.0,
                 consistency: float = 1.0, width: int = 16, noise_dim: int = 8, teacher: str | None = None,
                 seed: int = 0):
        checks = {"fraction": (fraction, 0 < fraction <= 1, "must be in (0, 1]"),
                  "strength": (strength, strength > 0, "must be > 0"),
                  "lr": (lr, lr > 0, "must be > 0"),
                  "temperature": (temperature, temperature > 0, "must be > 0"),
                  "consistency": (consistency, consistency >= 0, "must be >= 0"),
                  "width": (width, width >= 1, "must be >= 1"),
                  "noise_dim": (noise_dim, noise_dim >= 0, "must be >= 0")}
        for knob, (value, ok, rule) in checks.items():
            if not ok:
                raise KdkitError(f"selection.{self.name}.{knob}={value} {rule}")
        self.fraction, self.strength, self.lr = fraction, strength, lr
        self.temperature, self.consistency = temperature, consistency
        self.width, self.noise_dim = width, noise_dim
        self.teacher, self.seed = teacher, seed
        self.teacher_forwards = 0
        self.augmentor: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending: dict | None = None  # loaded before the augmentor was built
        self._stats = {}

    # ---- the augmentor ----------------------------------------------------------------------
    def make_augmentor(self, images: Tensor, generator: torch.Generator) -> nn.Module:
        """A new augmentor for ``images``' channels, its initial weights drawn from ``generator``."""
        return AffineAugmentor(images.shape[1], self.width, self.noise_dim, self.strength, generator=generator)

    def trainable(self) -> list[Tensor]:
        """The augmentor's weights its own step trains (a frozen part, e.g. a VAE, excluded)."""
        return [p for p in self.augmentor.parameters() if p.requires_grad]

    def build(self, images: Tensor) -> nn.Module:
        """The augmentor (created on first use for ``images``' channels and device)."""
        if self.augmentor is None:
            self.augmentor = self.make_augmentor(images, torch.Generator().manual_seed(self.seed)).to(images.device)
            self.optimizer = torch.optim.Adam(self.trainable(), lr=self.lr)
            if self._pending is not None:
                state, self._pending = self._pending, None
                self._apply_state(state)
        return self.augmentor

    def draws(self, batch_size: int, step: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """This step's noise ``[B, noise_dim]`` and augmented rows (sorted long indices): from a
        generator seeded by ``seed``, the global ``step`` and the DDP rank."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(step) * 997 + world()[0])
        noise = torch.randn(batch_size, self.noise_dim, generator=g)
        rows = torch.randperm(batch_size, generator=g)[:round(self.fraction * batch_size)].sort().values
        return noise.to(device), rows.to(device)

    def augment(self, images: Tensor, noise: Tensor) -> Tensor:
        """``x_hat`` for ``images`` with the augmentor's current weights (float32, outside any
        autocast; the result in the images' dtype)."""
        augmentor = self.build(images)
        with torch.autocast(images.device.type, enabled=False):
            return augmentor(images.float(), noise.float()).to(images.dtype)

    # ---- the step ---------------------------------------------------------------------------
    def plan(self, task, plan: StepPlan) -> StepPlan:
        if plan.distill_rows is not None or plan.teacher:
            raise KdkitError(f"selection.{self.name} must come first in `selection`: it replaces the "
                             "images, so earlier teacher outputs would not match them")
        if not isinstance(plan.batch.get("image"), Tensor) or plan.batch["image"].dim() != 4:
            raise KdkitError(f"selection.{self.name} augments images: it needs image classification batches "
                             "with an 'image' tensor [B, C, H, W]")
        name = policy_teacher(task, self.teacher, self.name)
        images = plan.batch["image"]
        b = _batch_size(plan.batch)
        noise, rows = self.draws(b, task.global_step, images.device)

        plain = task.teacher_outputs(plan.batch, name)  # the consistency target: cached where it can be
        # The backward stays inside buffers_kept: a train-mode BatchNorm's backward checks that
        # its running statistics were not modified in place since its forward.
        with torch.enable_grad(), buffers_kept(task.student):
            x_hat = self.augment(images, noise)
            hat_batch = {**plan.batch, "image": x_hat}
            t_hat = task.run_teacher(name, hat_batch, grad=True)
            s_hat = task.student_outputs(hat_batch)
            disagreement = per_sample_kl(t_hat.logits, s_hat.logits, self.temperature).mean()
            shift = per_sample_kl(plain.logits, t_hat.logits).mean()
            loss = -disagreement + self.consistency * shift
            params = self.trainable()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        self.teacher_forwards += 2 * b
        self._step(params, grads)
        self._stats = {"disagreement": disagreement.detach(), "teacher_shift": shift.detach()}

        final = images.clone()
        final[rows] = x_hat.detach()[rows]
        outputs = merge_rows(plain, t_hat.map(lambda t: t.detach()), rows)
        return StepPlan({**plan.batch, "image": final}, {name: outputs})

    def _step(self, params: list[Tensor], grads: tuple[Tensor | None, ...]) -> None:
        """One Adam step of the augmentor; gradients averaged over the DDP ranks first."""
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        _, size = world()
        if size > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat)
            flat /= size
            grads = list(torch.split(flat, [g.numel() for g in grads]))
        for p, g in zip(params, grads):
            p.grad = g.view_as(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ---- reports and resume -----------------------------------------------------------------
    def summary(self) -> dict:
        return {"fraction": self.fraction, "strength": self.strength, "teacher_forwards": self.teacher_forwards}

    def state_dict(self) -> dict:
        state = {"teacher_forwards": self.teacher_forwards}
        if self.augmentor is not None:
            state["augmentor"] = {k: v.detach().clone() for k, v in self.augmentor.state_dict().items()}
            state["optimizer"] = copy.deepcopy(self.optimizer.state_dict())
        elif self._pending is not None:  # loaded but not yet built: pass it on unchanged
            state.update({k: v for k, v in self._pending.items() if k != "teacher_forwards"})
        return state

    def load_state_dict(self, state: dict) -> None:
        self.teacher_forwards = state["teacher_forwards"]
        if "augmentor" not in state:
            return
        if self.augmentor is None:
            self._pending = copy.deepcopy(state)
        else:
            self._apply_state(state)

    def _apply_state(self, state: dict) -> None:
        self.augmentor.load_state_dict(state["augmentor"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))


def merge_rows(plain: Outputs, augmented: Outputs, rows: Tensor) -> Outputs:
    """Row-wise merge of two ``Outputs`` of the same batch: ``augmented`` on ``rows``, ``plain``
    elsewhere (scalars, which belong to no row, from ``plain``)."""
    hat = augmented.flat()

    def pick(key: str, value: Tensor) -> Tensor:
        if not value.dim():
            return value
        out = value.clone()
        out[rows] = hat[key][rows].to(out.dtype)
        return out

    return Outputs.from_flat({k: pick(k, v) for k, v in plain.flat().items()})
