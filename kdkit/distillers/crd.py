"""Contrastive representation distillation with momentum memory banks over dataset indices."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.distillers.adapters import NormalizedLinear
from kdkit.distillers.base import DistillContext, Distiller, require
from kdkit.distributed import gather_nograd
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

_EPS = 1e-7  # RepDistiller's guard in the NCE log-ratios


def sample_contrast(index: Tensor, num_samples: int, k: int) -> Tensor:
    """``[B, k + 1]`` dataset indices: column 0 the positive ``index``, then ``k`` negatives drawn
    uniformly (with replacement) from the *other* ``num_samples - 1`` indices, with torch's RNG."""
    negatives = torch.randint(0, num_samples - 1, (index.shape[0], k), device=index.device)
    negatives = negatives + (negatives >= index[:, None]).long()  # skip the positive itself
    return torch.cat([index[:, None], negatives], dim=1)


def nce_loss(p: Tensor, num_samples: int) -> Tensor:
    """CRD's NCE loss (Tian et al. 2020, Eq. 18; RepDistiller's ``ContrastLoss``).

    ``p``: ``[B, K + 1]`` unnormalised model probabilities ``exp(score / T) / Z``, positive
    first. With noise probability ``P_n = 1 / N``:
    ``-(1/B) sum_i [ log p_i0 / (p_i0 + K P_n) + sum_k log K P_n / (p_ik + K P_n) ]``.
    """
    k = p.shape[1] - 1
    noise = k / num_samples
    log_d1 = torch.log(p[:, 0] / (p[:, 0] + noise + _EPS))
    log_d0 = torch.log(noise / (p[:, 1:] + noise + _EPS))
    return -(log_d1.sum() + log_d0.sum()) / p.shape[0]


def infonce_loss(scores: Tensor) -> Tensor:
    """Softmax cross-entropy with the positive (column 0) as the target, ``scores`` already / T."""
    return F.cross_entropy(scores, torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device))


class CRD(Distiller):
    """Contrastive Representation Distillation (Tian, Krishnan & Isola, ICLR 2020).

    Student and teacher embeddings are projected by trainable heads (Linear + L2 norm) to
    ``feat_dim``; ``v^s_i``, ``v^t_i``. Two memory banks hold, for every training index, a
    momentum average of past ``v^s`` and ``v^t``. For a sample ``i`` with ``K`` negatives ``j``
    drawn from the other indices, the critic is ``h(v, m) = exp(<v, m> / T) / Z`` and

        L_CRD = NCE(v^s_i vs teacher bank [i, j_1..j_K]) + NCE(v^t_i vs student bank [i, j_1..j_K])

    with ``Z`` fixed on the first batch to ``mean(exp(scores / T)) * N`` (as in RepDistiller)
    and the NCE loss of ``nce_loss``. ``loss: infonce`` replaces the NCE terms by softmax
    cross-entropy over the same ``K + 1`` scores (no ``Z`` needed). After the loss, the banks
    move to ``normalize(m * bank[i] + (1 - m) * v_i)`` at the batch indices of *every* rank.

    Deviation: RepDistiller's CIFAR loader draws negatives from other *classes*; here they are
    uniform over all other indices (the paper's formulation), drawn with torch's RNG.

    Needs ``batch["index"]`` and ``context.num_samples``. The banks and ``Z`` are persistent
    buffers (in checkpoints); the heads train with the student. Under DDP every rank must see
    the same batch size (``drop_last=True``). Returns the single term ``"loss"``.

    Args:
        weight: multiplier of the loss (RepDistiller on CIFAR-100: 0.8).
        feat_dim: width of the projected embeddings.
        nce_k: negatives per sample (the paper: 16384); capped at ``num_samples - 1``.
        temperature: ``T`` of the critic.
        momentum: ``m`` of the memory-bank update.
        loss: "nce" (the paper's loss) or "infonce".
    """

    reads_sample_index = True  # a memory-bank row per training sample

    def __init__(self, weight: float = 0.8, feat_dim: int = 128, nce_k: int = 16384,
                 temperature: float = 0.07, momentum: float = 0.5, loss: str = "nce"):
        super().__init__(weight)
        if loss not in ("nce", "infonce"):
            raise KdkitError(f"crd.loss must be 'nce' or 'infonce', got {loss!r}")
        if temperature <= 0 or not 0 <= momentum < 1 or nce_k < 1 or feat_dim < 1:
            raise KdkitError(
                f"crd: need temperature > 0, 0 <= momentum < 1, nce_k >= 1, feat_dim >= 1; got "
                f"temperature={temperature}, momentum={momentum}, nce_k={nce_k}, feat_dim={feat_dim}"
            )
        self.feat_dim, self.nce_k = int(feat_dim), int(nce_k)
        self.temperature, self.momentum, self.loss = float(temperature), float(momentum), loss
        self.num_samples: int | None = None
        self.embed_s = self.embed_t = None
        self._z_ready = False

    @property
    def rank_synced_buffers(self) -> tuple[str, ...]:  # every rank applies the gathered updates
        return ("memory_s", "memory_t", "z") if self.embed_s is not None else ()

    @property
    def k(self) -> int:
        return min(self.nce_k, self.num_samples - 1)

    def build(self, student: Outputs, teacher: Outputs, context: DistillContext) -> None:
        s = require(student, "embedding", "crd").flatten(1)
        t = require(teacher, "embedding", "crd").flatten(1)
        n = context.num_samples
        if n is None or n < 2:
            raise KdkitError(f"crd needs the training-set size (datamodule.num_train_samples >= 2), got {n}")
        self.num_samples = int(n)
        self.embed_s = NormalizedLinear(s.shape[1], self.feat_dim).to(s.device)
        self.embed_t = NormalizedLinear(t.shape[1], self.feat_dim).to(s.device)
        # RepDistiller's initialisation: uniform in [-stdv, stdv], stdv = 1/sqrt(feat_dim/3).
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        for name in ("memory_s", "memory_t"):
            bank = torch.rand(self.num_samples, self.feat_dim, device=s.device) * (2 * stdv) - stdv
            self.register_buffer(name, bank)
        # Z for [student anchor vs teacher bank, teacher anchor vs student bank]; < 0 = unset.
        self.register_buffer("z", torch.full((2,), -1.0, device=s.device))

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        if self.embed_s is None:
            raise RuntimeError("crd: build() must run (on a probe forward) before forward()")
        index = batch.get("index")
        if index is None:
            raise KdkitError("crd needs batch['index'] (the dataset index of each sample)")
        index = index.to(self.memory_s.device).long()
        s = require(student, "embedding", "crd").flatten(1)
        t = require(teacher, "embedding", "crd").flatten(1)
        if index.shape != (s.shape[0],):
            raise KdkitError(f"crd: batch['index'] has shape {tuple(index.shape)}, expected ({s.shape[0]},)")
        v_s, v_t = self.embed_s(s), self.embed_t(t)

        contrast = sample_contrast(index, self.num_samples, self.k)
        # Banks are buffers, so the gathered rows carry no gradient: only v_s / v_t learn.
        # float32 even under autocast: exp(score / 0.07) magnifies bf16 rounding of the score.
        with torch.autocast(v_s.device.type, enabled=False):
            scores_s = torch.bmm(self.memory_t[contrast], v_s[:, :, None]).squeeze(2) / self.temperature
            scores_t = torch.bmm(self.memory_s[contrast], v_t[:, :, None]).squeeze(2) / self.temperature
        if self.loss == "infonce":
            loss = infonce_loss(scores_s) + infonce_loss(scores_t)
        else:
            p_s, p_t = scores_s.exp(), scores_t.exp()
            if not self._z_ready:  # one host sync per run, not per step
                if bool((self.z < 0).any()):
                    self._set_z(p_s, p_t)
                self._z_ready = True
            loss = nce_loss(p_s / self.z[0], self.num_samples) + nce_loss(p_t / self.z[1], self.num_samples)
        if self.training:
            self.update_banks(index, v_s, v_t)
        return {"loss": loss}

    def _load_from_state_dict(self, *args, **kwargs):
        self._z_ready = False  # a loaded Z may still be unset (< 0): check it again
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def _set_z(self, p_s: Tensor, p_t: Tensor) -> None:
        means = torch.stack([p_s.mean(), p_t.mean()])
        # Averaged over ranks so that every rank normalises by the same constant.
        self.z.copy_(gather_nograd(means[None]).mean(dim=0) * self.num_samples)

    @torch.no_grad()
    def update_banks(self, index: Tensor, v_s: Tensor, v_t: Tensor) -> None:
        """``bank[i] <- normalize(m * bank[i] + (1 - m) * v_i)`` for the indices of all ranks."""
        index = gather_nograd(index)
        for bank, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
            v = gather_nograd(v.detach().float())
            mixed = bank[index] * self.momentum + v * (1 - self.momentum)
            bank.index_copy_(0, index, F.normalize(mixed, dim=1))

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, feat_dim={self.feat_dim}, nce_k={self.nce_k}, "
                f"temperature={self.temperature}, momentum={self.momentum}, loss={self.loss!r}, "
                f"num_samples={self.num_samples}")
