"""Multi-scale decoupled contrastive distillation on pooled local features, in-batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.distillers.adapters import LinearAdapter
from kdkit.distillers.at import parse_pairs
from kdkit.distillers.base import DistillContext
from kdkit.distillers.map_pairs import MapPairs, paired_maps
from kdkit.distributed import gather
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs


def local_vectors(f: Tensor, scale: int) -> Tensor:
    """``[B, C, H, W]`` average-pooled on a ``scale x scale`` grid -> ``[B, scale^2, C]``."""
    return F.adaptive_avg_pool2d(f, scale).flatten(2).transpose(1, 2)


def decoupled_infonce(scores: Tensor, offset: int = 0) -> Tensor:
    """Decoupled contrastive loss (Yeh et al., ECCV 2022) averaged over rows and groups.

    ``scores [G, B, N]`` (already / T): for group ``g`` and row ``i`` the positive is column
    ``i + offset``, every other column a negative; the positive is left out of the denominator:
    ``mean_{g,i} [ -s_{g,i,i+o} + log sum_{j != i+o} exp s_{g,i,j} ]``.
    """
    rows = torch.arange(scores.shape[1], device=scores.device)
    positive = scores[:, rows, rows + offset]
    mask = torch.zeros(scores.shape[1:], dtype=torch.bool, device=scores.device)
    mask[rows, rows + offset] = True
    negatives = scores.masked_fill(mask, float("-inf")).logsumexp(dim=-1)
    return (negatives - positive).mean()


class MSDCRD(MapPairs):
    """Contrastive Representation Distillation via Multi-Scale Feature Decoupling (MSDCRD;
    Wang & Wang, arXiv 2502.05835, 2025).

    MSDCRD decouples a feature map into local features at several scales (sliding-window
    pooling) and contrasts them within the batch, without CRD's memory bank. In kdkit, for each
    ``[student_module, teacher_module]`` pair and each scale ``s`` (an ``s x s`` grid of average
    pools), the local vectors at position ``p`` are projected by linear heads (adapters, one per
    side and pair, shared by scales and positions) to ``feat_dim`` and L2-normalised,
    ``v^s_{i,p}``, ``v^t_{j,p}``; with ``s_ij = <v^s_{i,p}, v^t_{j,p}> / T``:

        L_{pair,s} = mean_{p, i} [ -s_ii + log sum_{j != i} exp(s_ij) ]
        L = sum over pairs of mean over scales of L_{pair,s}

    The positive of a student local vector is the teacher's vector of the same sample at the
    same position; the negatives are the other samples' teacher vectors at that position; the
    positive is dropped from the denominator (decoupled contrastive learning, DCL), so the loss
    can be negative. Under DDP the teacher columns are gathered from every rank (gradients go
    back to their owner), as in ``kdkit.losses.contrastive``. Scores are in float32.

    What differs from the paper (only its abstract could be checked here): kdkit uses
    non-overlapping adaptive average pooling grids for the "sliding-window pooling", applies
    only the sample-wise in-batch contrast (student anchor vs teacher vectors), and implements
    neither the paper's sample categorisation nor its feature-wise contrastive loss; the
    projection heads, ``feat_dim`` and ``T`` follow CRD (Tian et al. 2020; RepDistiller's
    128 and 0.07), not numbers from the paper. Returns the single term ``"loss"``.

    Args:
        weight: multiplier of the loss.
        pairs: ``[[student_module, teacher_module], ...]`` of maps ``[B, C, H, W]``.
        scales: grid sizes of the pooled local features (each <= the maps' height and width).
        feat_dim: width of the projected local vectors.
        temperature: ``T`` of the scores.
    """

    def __init__(self, weight: float = 1.0, pairs: Sequence = (("layer3", "layer3"),),
                 scales: Sequence[int] = (1, 2, 4), feat_dim: int = 128, temperature: float = 0.07):
        super().__init__(weight)
        self.pairs = parse_pairs(pairs, "msdcrd")
        self.scales = [int(s) for s in scales]
        if not self.scales or min(self.scales) < 1:
            raise KdkitError(f"msdcrd.scales must be a non-empty list of grid sizes >= 1, got {list(scales)}")
        if temperature <= 0 or feat_dim < 1:
            raise KdkitError(f"msdcrd: need temperature > 0 and feat_dim >= 1, got "
                             f"temperature={temperature}, feat_dim={feat_dim}")
        self.feat_dim, self.temperature = int(feat_dim), float(temperature)
        self.embed_s: nn.ModuleList | None = None
        self.embed_t: nn.ModuleList | None = None

    def build(self, student: Outputs, teacher: Outputs, context: DistillContext) -> None:
        heads_s, heads_t = [], []
        for (s_name, t_name), (f_s, f_t) in zip(self.pairs, paired_maps(student, teacher, self.pairs, "msdcrd")):
            smallest = min(*f_s.shape[2:], *f_t.shape[2:])
            if max(self.scales) > smallest:
                raise KdkitError(f"msdcrd: scale {max(self.scales)} is finer than pair [{s_name}, {t_name}]'s "
                                 f"smallest map side {smallest}; lower msdcrd.scales")
            heads_s.append(LinearAdapter(f_s.shape[1], self.feat_dim))
            heads_t.append(LinearAdapter(f_t.shape[1], self.feat_dim))
        self.embed_s = nn.ModuleList(heads_s).to(f_s.device)
        self.embed_t = nn.ModuleList(heads_t).to(f_s.device)

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        if self.embed_s is None:
            raise RuntimeError("msdcrd: build() must run (on a probe forward) before forward()")
        total = 0.0
        for k, (f_s, f_t) in enumerate(paired_maps(student, teacher, self.pairs, "msdcrd")):
            if f_s.shape[0] < 2:
                raise KdkitError(f"msdcrd contrasts samples of a batch: needs batch size >= 2, got {f_s.shape[0]}")
            per_scale = []
            for scale in self.scales:
                v_s = self.embed_s[k](local_vectors(f_s, scale))  # [B, P, feat_dim]
                v_t = self.embed_t[k](local_vectors(f_t, scale))
                # float32 even under autocast: a score / 0.07 magnifies bf16 rounding.
                with torch.autocast(v_s.device.type, enabled=False):
                    v_s, v_t = F.normalize(v_s.float(), dim=-1), F.normalize(v_t.float(), dim=-1)
                    columns, offset = gather(v_t)  # [B_global, P, feat_dim]
                    scores = torch.einsum("ipd,jpd->pij", v_s, columns) / self.temperature
                    per_scale.append(decoupled_infonce(scores, offset))
            total = total + torch.stack(per_scale).mean()
        return {"loss": total}

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, pairs={self.pairs}, scales={self.scales}, "
                f"feat_dim={self.feat_dim}, temperature={self.temperature}")
