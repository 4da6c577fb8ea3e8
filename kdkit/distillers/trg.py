"""Token-level relationship graph distillation: patch tokens as graph nodes, similarities as edges."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.distillers.base import DistillContext, FeaturePair
from kdkit.distillers.map_pairs import pool_to_smaller
from kdkit.distillers.token_layout import as_map, map_to_tokens
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs


def contextual_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """TRG's token-wise contextual loss (inner-instance relations), per image:

        CS = softmax_row(F F^T / sqrt(D)),   L_inner = MSE(CS^S, CS^T)

    Args:
        f_s: student patch tokens ``[B, N, D_s]``.
        f_t: teacher patch tokens ``[B, N, D_t]`` (same ``N``; widths may differ).

    Returns the mean over ``B * N * N`` entries, in float32.
    """
    with torch.autocast(f_s.device.type, enabled=False):
        cs = [torch.softmax(f @ f.transpose(1, 2) / math.sqrt(f.shape[-1]), dim=-1)
              for f in (f_s.float(), f_t.float())]
        return F.mse_loss(cs[0], cs[1])


def knn_edges(z_t: Tensor, k: int) -> Tensor:
    """Indices ``[M, k]`` of each node's ``k`` nearest other nodes in the teacher's graph
    (Euclidean distance between L2-normalised tokens, i.e. largest cosine; self excluded)."""
    with torch.no_grad(), torch.autocast(z_t.device.type, enabled=False):
        z = F.normalize(z_t.float(), dim=1)
        sim = z @ z.T
        sim.fill_diagonal_(-math.inf)
        return sim.topk(k, dim=1).indices


def local_loss(z_s: Tensor, z_t: Tensor, k: int = 8, sigma: float = 0.1) -> Tensor:
    """TRG's local preserving loss on the token graph of a batch (node-level relations).

    With ``z_hat`` the L2-normalised node tokens and ``N_k(i)`` the teacher's ``k`` nearest
    neighbours of node ``i`` (self excluded), edges carry a Gaussian kernel

        A_ij = exp(-||z_hat_i - z_hat_j||^2 / (2 sigma)),   j in N_k(i)  (0 off the graph)
        P_ij = A_ij / sum_{m in N_k(i)} A_im = softmax_{j in N_k(i)}(cos(z_i, z_j) / sigma)
        L_local = mean_i KL(P^T_i || P^S_i)

    Both graphs use the teacher's edges, so the student learns the teacher's neighbourhood
    weights of every node. ``k`` is capped at ``M - 1``.

    Args:
        z_s: student nodes ``[M, D_s]``. z_t: teacher nodes ``[M, D_t]`` (widths may differ).
        k: neighbours per node. sigma: kernel width (on normalised tokens).
    """
    m = z_s.shape[0]
    k = min(int(k), m - 1)
    if k < 1:  # a graph of one node has no edges
        return z_s.float().sum() * 0.0
    neighbours = knn_edges(z_t, k)
    with torch.autocast(z_s.device.type, enabled=False):
        logits = []
        for z in (z_t.float(), z_s.float()):
            z = F.normalize(z, dim=1)
            logits.append((z[:, None, :] * z[neighbours]).sum(-1) / sigma)  # [M, k] cosines
        log_p_t, log_p_s = (torch.log_softmax(x, dim=1) for x in logits)
        return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()


def global_loss(p_s: Tensor, z_t: Tensor, temperature: float = 0.1) -> Tensor:
    """TRG's global contrastive loss (graph-level relations): InfoNCE over the batch's nodes.

        L_global = -mean_i log( exp(SIM(p_i, t_i) / tau_g) / sum_j exp(SIM(p_i, t_j) / tau_g) )

    with SIM the cosine similarity, ``p_i`` the projected student node and ``t_j`` the teacher
    nodes: the same token of the teacher is the positive, every other node a negative.

    Args:
        p_s: projected student nodes ``[M, D_t]``. z_t: teacher nodes ``[M, D_t]``.
        temperature: ``tau_g``.
    """
    with torch.autocast(p_s.device.type, enabled=False):
        logits = F.normalize(p_s.float(), dim=1) @ F.normalize(z_t.float(), dim=1).T / temperature
        return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def sample_nodes(f_s: Tensor, f_t: Tensor, per_image: int | None) -> tuple[Tensor, Tensor]:
    """The graph's nodes: ``per_image`` random patch positions of every image (the same ones
    on both sides; None or at least ``N``: all), as ``[M, D_s]`` and ``[M, D_t]``.
    Draws from the global RNG (seeded by ``seed_everything``)."""
    b, n, _ = f_s.shape
    if per_image is not None and per_image < n:
        idx = torch.rand(b, n, device=f_s.device).argsort(dim=1)[:, :per_image]
        f_s = f_s.gather(1, idx[..., None].expand(-1, -1, f_s.shape[-1]))
        f_t = f_t.gather(1, idx[..., None].expand(-1, -1, f_t.shape[-1]))
    return f_s.reshape(-1, f_s.shape[-1]), f_t.reshape(-1, f_t.shape[-1])


class TRG(FeaturePair):
    """Knowledge Distillation via Token-level Relationship Graph (Zhang, Liu & He, arXiv
    2306.12442, 2023).

    The patch tokens of one layer of each network become graph nodes (a CNN map is read as
    tokens, one per position; the prefix (CLS / distillation) tokens of a ViT are dropped),
    and the student learns the teacher's relations between them:

        L = alpha * L_inner + beta * L_local + gamma * L_global

    * ``inner``: the token-wise contextual loss, the MSE between each image's token affinity
      ``softmax(F F^T / sqrt(D))`` of both networks (``contextual_loss``), over all tokens.
    * ``local``: the student's Gaussian-kernel edge weights on the teacher's kNN graph of the
      batch's sampled tokens, matched by KL (``local_loss``).
    * ``global``: InfoNCE between a learned linear projection ``W`` (``D_s -> D_t``) of each
      student node and the teacher's nodes, the same token positive (``global_loss``), with
      temperature ``tau_g``, optionally annealed from ``temperature_start`` to ``temperature``
      over ``temperature_steps`` training steps (the paper's dynamic temperature: coarse
      structure first, fine later).

    The graph spans the whole batch (tokens of different images are neighbours and
    negatives); ``tokens_per_image`` random positions per image keep it small, as in the paper.

    Token counts: when the two patch grids differ, the larger map is area-pooled to the
    smaller grid (``resize_map``), parameter-free, so the relation terms compare each network's
    own tokens; widths never need to match except through ``W``. The relation terms are
    width-free: ``inner`` is ``N x N`` per image, ``local`` ``M x k``.

    Departures from the paper (our reading of it; its code was not available to us):
    the edge kernel acts on L2-normalised tokens (so one ``sigma`` suits both networks and any
    width), both graphs use the teacher's kNN edges, ``local`` normalises the kernel over each
    node's neighbours and uses KL(teacher || student) (the paper writes the softmax of the
    adjacency and the KL with the student first), every term is a mean (over entries, nodes)
    rather than a sum, negatives come from the batch only (no memory bank), the temperature
    schedule is linear with user-set ends, and a CNN map is tokenised per position rather
    than in larger patches. The logit (KD) term of the paper's total loss is not part of
    this distiller: add ``kd`` alongside. Default weights, ``k``, ``sigma`` and the node
    count are ours, not the paper's (tune them). Returns ``"inner"``, ``"local"``,
    ``"global"`` (each already multiplied by its weight; terms of weight 0 are skipped).

    Args:
        weight: multiplier of every term.
        student_feature, teacher_feature: modules whose outputs (tokens ``[B, P + N, D]`` or
            maps ``[B, C, H, W]``) give the nodes.
        student_prefix_tokens, teacher_prefix_tokens: ``P`` of a token side (1: CLS, 2: CLS +
            distillation token, 0: none); required for token features, ignored for maps.
        inner_weight, local_weight, global_weight: ``alpha``, ``beta``, ``gamma``.
        tokens_per_image: nodes drawn per image for ``local`` / ``global`` (None: all).
        k: neighbours per node in the kNN graph. sigma: edge kernel width.
        temperature: ``tau_g`` (after annealing). temperature_start: ``tau_g`` at step 0
            (None: constant). temperature_steps: length of the linear anneal.
    """

    def __init__(self, weight: float = 1.0, student_feature: str = "layer3",
                 teacher_feature: str = "layer3", student_prefix_tokens: int | None = None,
                 teacher_prefix_tokens: int | None = None, inner_weight: float = 1.0,
                 local_weight: float = 1.0, global_weight: float = 1.0,
                 tokens_per_image: int | None = 16, k: int = 8, sigma: float = 0.1,
                 temperature: float = 0.1, temperature_start: float | None = None,
                 temperature_steps: int = 0):
        super().__init__(weight)
        self.student_feature, self.teacher_feature = str(student_feature), str(teacher_feature)
        self.prefix_tokens = {"student": student_prefix_tokens, "teacher": teacher_prefix_tokens}
        self.weights = {"inner": float(inner_weight), "local": float(local_weight),
                        "global": float(global_weight)}
        if min(self.weights.values()) < 0 or max(self.weights.values()) == 0:
            raise KdkitError(f"trg: term weights must be >= 0 with at least one > 0, got "
                             f"inner_weight={inner_weight}, local_weight={local_weight}, "
                             f"global_weight={global_weight}")
        if tokens_per_image is not None and int(tokens_per_image) < 1:
            raise KdkitError(f"trg.tokens_per_image must be >= 1 (or null: all), got {tokens_per_image}")
        if int(k) < 1:
            raise KdkitError(f"trg.k must be >= 1, got {k}")
        for name, value in (("sigma", sigma), ("temperature", temperature),
                            ("temperature_start", temperature_start)):
            if value is not None and value <= 0:
                raise KdkitError(f"trg.{name} must be > 0, got {value}")
        self.tokens_per_image = None if tokens_per_image is None else int(tokens_per_image)
        self.k, self.sigma = int(k), float(sigma)
        self.temperature = float(temperature)
        self.temperature_start = None if temperature_start is None else float(temperature_start)
        self.temperature_steps = int(temperature_steps)
        self.projection: nn.Module | None = None

    def global_temperature(self) -> float:
        """``tau_g`` at the current training step (``self.progress``)."""
        if self.temperature_start is None or self.temperature_steps <= 0:
            return self.temperature
        frac = min(self.progress[1] / self.temperature_steps, 1.0)
        return self.temperature_start + frac * (self.temperature - self.temperature_start)

    def _tokens(self, student: Outputs, teacher: Outputs) -> tuple[Tensor, Tensor]:
        """Both sides' patch tokens ``[B, N, D_*]`` on one grid (the smaller, by area pooling)."""
        s, t = self.feature_pair(student, teacher, "trg")
        shapes = f"student shape {tuple(s.shape[1:])}, teacher shape {tuple(t.shape[1:])}"
        if s.dim() not in (3, 4) or t.dim() not in (3, 4):
            raise KdkitError(f"trg: [{self.student_feature}, {self.teacher_feature}] must be tokens "
                             f"[N, D] or maps [C, H, W], got {shapes}")
        try:
            s = as_map(s, self.prefix_tokens["student"], "trg", "student", self.student_feature)
            t = as_map(t, self.prefix_tokens["teacher"], "trg", "teacher", self.teacher_feature)
        except KdkitError as err:
            raise KdkitError(f"{err} ({shapes})") from None
        return tuple(map_to_tokens(m) for m in pool_to_smaller(s, t))

    def build(self, student: Outputs, teacher: Outputs, context: DistillContext) -> None:
        f_s, f_t = self._tokens(student, teacher)
        if self.weights["global"] > 0:
            self.projection = nn.Linear(f_s.shape[-1], f_t.shape[-1]).to(f_s.device)

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        f_s, f_t = self._tokens(student, teacher)
        terms = {}
        if self.weights["inner"] > 0:
            terms["inner"] = self.weights["inner"] * contextual_loss(f_s, f_t)
        if self.weights["local"] > 0 or self.weights["global"] > 0:
            z_s, z_t = sample_nodes(f_s, f_t, self.tokens_per_image)
            if self.weights["local"] > 0:
                terms["local"] = self.weights["local"] * local_loss(z_s, z_t, self.k, self.sigma)
            if self.weights["global"] > 0:
                if self.projection is None:
                    raise RuntimeError("trg: build() must run (on a probe forward) before forward()")
                terms["global"] = self.weights["global"] * global_loss(
                    self.projection(z_s), z_t, self.global_temperature())
        return terms

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, student_feature={self.student_feature!r}, "
                f"teacher_feature={self.teacher_feature!r}, prefix_tokens={self.prefix_tokens}, "
                f"weights={self.weights}, tokens_per_image={self.tokens_per_image}, k={self.k}, "
                f"sigma={self.sigma}, temperature={self.temperature}, "
                f"temperature_start={self.temperature_start}, temperature_steps={self.temperature_steps}")
