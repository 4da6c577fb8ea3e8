"""Overhaul of feature distillation: pre-ReLU teacher features, a margin for negative
responses and a partial L2 distance."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdkit.distillers.adapters import ConvAdapter
from kdkit.distillers.at import parse_pairs
from kdkit.distillers.base import DistillContext
from kdkit.distillers.map_pairs import MapPairs, paired_maps
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

# Pre-ReLU outputs of the three stages of kdkit's CIFAR resnet8 (student) and resnet20 (teacher).
DEFAULT_PAIRS = tuple((f"layer{i}.0.relu2:input", f"layer{i}.2.relu2:input") for i in (1, 2, 3))


def gaussian_margin(mean: Tensor, std: Tensor) -> Tensor:
    """OFD's margin ``E[x | x < 0]`` for ``x ~ N(mean, std^2)`` per channel:

        m - s * phi(m / s) / Phi(-m / s)    if Phi(-m / s) > 0.001,   else  -3 s.
    """
    std = std.clamp(min=1e-12)
    z = mean / std
    tail = 0.5 * torch.erfc(z / math.sqrt(2.0))  # Phi(-z)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    inside = mean - std * pdf / tail.clamp(min=1e-3)
    return torch.where(tail > 1e-3, inside, -3.0 * std)


def partial_l2(s: Tensor, t: Tensor, margin: Tensor) -> Tensor:
    """``sum_{c,h,w} d_p(T, S) / B`` with ``T = max(t, margin)``: ``(T - s)^2`` except where
    ``s <= T <= 0`` (the student is already below the teacher's non-positive response)."""
    target = torch.maximum(t, margin.view(1, -1, 1, 1))
    keep = (s > target) | (target > 0)
    return ((s - target).pow(2) * keep).sum() / s.shape[0]


class OFD(MapPairs):
    """A Comprehensive Overhaul of Feature Distillation (Heo, Kim, Yun, Park, Kwak & Choi,
    ICCV 2019).

    The teacher feature ``T`` is tapped *before* its ReLU and clipped from below at a
    per-channel margin ``m_c = E[t_c | t_c < 0]``; the student feature ``S`` (also pre-ReLU)
    passes a connector ``r`` (1x1 conv + BN, see ``ConvAdapter``). Per pair ``i`` of ``n``:

        d_p(T, S) = 0 if S <= T <= 0, else (T - S)^2,    T = max(T, m)
        L_OFD = sum_i 2^{-(n - 1 - i)} * (1 / B) sum_{b,c,h,w} d_p(max(T_i, m_i), r(S_i))

    so deeper pairs count more (the official code and mdistiller); the sum runs over channels
    and positions and is averaged over the batch, hence mdistiller's CIFAR weight 1e-3.

    The margin (how kdkit finds it). In the paper ``m_c`` is computed from the BatchNorm that
    precedes the teacher's ReLU, assuming its output is ``N(beta_c, gamma_c^2)``. A kdkit
    distiller's ``build`` receives only the models' *outputs* (the teacher may even be served
    from a cache), not their modules, so kdkit fits the same Gaussian to the tapped teacher
    tensor itself: ``mean_c`` and ``std_c`` over batch and positions, accumulated over the probe
    batch and the first ``margin_steps`` training batches (persistent buffers, frozen after),
    then the paper's formula ``m_c = mean - std * phi(mean/std) / Phi(-mean/std)`` (``-3 std``
    where ``Phi(-mean/std) <= 0.001``, as in the official code). For a ResNet stage output the
    tapped pre-ReLU tensor is ``bn2(...) + shortcut``, whose distribution is what the margin is
    meant to describe; ``(beta, gamma)`` of ``bn2`` alone ignore the shortcut. Each rank
    accumulates its own statistics under DDP.

    Other differences: a student map spatially different from the teacher's is resized to the
    teacher's size by the connector (mdistiller pools the teacher instead); the connector's
    convolution keeps PyTorch's default initialisation. Returns the single term ``"loss"``.

    Args:
        weight: multiplier of the loss (mdistiller CIFAR-100: 0.001).
        pairs: ``[[student_module, teacher_module], ...]`` of pre-ReLU maps, shallow to deep.
        margin_steps: training batches whose teacher features refine the margin statistics
            after the probe batch (0: the probe batch alone).
    """

    def __init__(self, weight: float = 1e-3, pairs: Sequence = DEFAULT_PAIRS, margin_steps: int = 100):
        super().__init__(weight)
        self.pairs = parse_pairs(pairs, "ofd")
        if margin_steps < 0:
            raise KdkitError(f"ofd.margin_steps must be >= 0, got {margin_steps}")
        self.margin_steps = int(margin_steps)
        self.connectors = nn.ModuleList()
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def build(self, student: Outputs, teacher: Outputs, context: DistillContext) -> None:
        self.connectors = nn.ModuleList()
        for i, (f_s, f_t) in enumerate(paired_maps(student, teacher, self.pairs, "ofd")):
            self.connectors.append(ConvAdapter(f_s.shape[1], f_t.shape[1], f_t.shape[2:]).to(f_s.device))
            # [count, sum, sum of squares] per teacher channel
            self.register_buffer(f"stats{i}", torch.zeros(3, f_t.shape[1], device=f_t.device))
            self._accumulate(i, f_t, 1.0)

    def _accumulate(self, i: int, f_t: Tensor, active: Tensor | float) -> None:
        x = f_t.detach().float().transpose(0, 1).flatten(1)  # [C, B*H*W]
        moments = torch.stack([torch.full_like(x[:, 0], x.shape[1]), x.sum(1), x.pow(2).sum(1)])
        getattr(self, f"stats{i}").add_(moments * active)

    def margin(self, i: int) -> Tensor:
        """The current margin ``[C_t]`` of pair ``i`` from its accumulated statistics."""
        count, total, squares = getattr(self, f"stats{i}")
        mean = total / count
        std = (squares / count - mean.pow(2)).clamp(min=0).sqrt()
        return gaussian_margin(mean, std)

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        if len(self.connectors) != len(self.pairs):
            raise RuntimeError("ofd: build() must run (on a probe forward) before forward()")
        if self.training:
            active = (self.step < self.margin_steps).float()  # no host sync
            self.step += 1
        n, total = len(self.pairs), 0.0
        for i, ((f_s, f_t), connector) in enumerate(zip(paired_maps(student, teacher, self.pairs, "ofd"), self.connectors)):
            if self.training:
                self._accumulate(i, f_t, active)
            s = connector(f_s, f_t.shape[2:]).float()
            total = total + partial_l2(s, f_t.float(), self.margin(i)) / 2 ** (n - 1 - i)
        return {"loss": total}

    def extra_repr(self) -> str:
        return f"weight={self.weight}, pairs={self.pairs}, margin_steps={self.margin_steps}"
