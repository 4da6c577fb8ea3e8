"""LELP: pseudo-subclass labels from per-class principal directions of the teacher's embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.distillers.base import DistillContext, Distiller, require
from kdkit.distributed import gather_nograd
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

_RIDGE = 1e-6  # relative ridge of the subspace iteration (keeps unseen classes' directions)


def merge_moments(count: Tensor, mean: Tensor, m2: Tensor, x: Tensor, label: Tensor):
    """Per-class ``(count, mean, M2)`` after adding the rows ``x [N, D]`` of classes ``label``.

    ``M2`` is the sum of outer products of deviations from the mean (``cov = M2 / count``),
    merged batch-wise with Chan et al.'s parallel update, which stays accurate in float32:
    ``M2 = M2_a + M2_b + delta delta^T n_a n_b / n``, ``delta = mean_b - mean_a``.
    """
    n_b = torch.zeros_like(count).index_add_(0, label, torch.ones_like(label, dtype=x.dtype))
    mean_b = torch.zeros_like(mean).index_add_(0, label, x) / n_b.clamp(min=1)[:, None]
    dev = x - mean_b[label]
    m2_b = torch.zeros_like(m2).index_add_(0, label, dev[:, :, None] * dev[:, None, :])
    n = count + n_b
    delta = mean_b - mean
    frac_b = torch.where(n > 0, n_b / n.clamp(min=1), torch.zeros_like(n))
    new_mean = mean + delta * frac_b[:, None]
    cross = (count * frac_b)[:, None, None] * delta[:, :, None] * delta[:, None, :]  # n_a n_b / n
    return n, new_mean, m2 + m2_b + cross


def subspace_step(cov: Tensor, dirs: Tensor) -> Tensor:
    """One step of subspace (block power) iteration per class: ``orth((cov + r I) dirs)``.

    ``cov [C, D, D]``, ``dirs [C, D, k]`` orthonormal columns. The QR factor's columns are
    multiplied by the signs of ``diag(R)``, so a converged direction keeps its sign from step to
    step (subclass labels do not flip). ``r`` is a tiny ridge relative to the trace.
    """
    d = cov.shape[-1]
    ridge = _RIDGE * cov.diagonal(dim1=-2, dim2=-1).sum(-1) / d + 1e-12
    eye = torch.eye(d, device=cov.device, dtype=cov.dtype)
    q, r = torch.linalg.qr((cov + ridge[:, None, None] * eye) @ dirs)
    signs = torch.sign(r.diagonal(dim1=-2, dim2=-1))
    return q * torch.where(signs == 0, torch.ones_like(signs), signs)[:, None, :]


def assign_subclasses(h: Tensor, label: Tensor, mean: Tensor, dirs: Tensor, var: Tensor) -> Tensor:
    """Subclass in ``0 .. 2k-1`` of each row: argmax over ``[p, -p]`` of the standardised
    projections ``p_j = u_{y,j} . (h - mu_y) / sqrt(lambda_{y,j})`` on its class's directions."""
    p = torch.einsum("nd,ndk->nk", h - mean[label], dirs[label]) / var[label].clamp(min=1e-12).sqrt()
    return torch.cat([p, -p], dim=1).argmax(dim=1)


class LELP(Distiller):
    """Learning Embedding Linear Projections (Loo, Iliopoulos, Hu & Vee, "Linear Projections of
    Teacher Embeddings for Few-Class Distillation", arXiv 2409.20449, 2024).

    LELP splits every class of the teacher's embedding space into pseudo-subclasses along the
    informative linear directions of that class (per-class PCA of the teacher embeddings), and
    trains the student to predict the (class, subclass) labels, which carries more of the
    teacher's knowledge than C class probabilities when C is small (binary / few-class tasks).

    kdkit's version, on the teacher embedding ``h^t`` and the label ``y``:

        mu_c, Sigma_c       running mean / covariance of the h^t of class c (all samples seen)
        u_{c,1..k}          top-k eigenvectors of Sigma_c, eigenvalues lambda_{c,j}
        p_j   = u_{y,j} . (h^t - mu_y) / sqrt(lambda_{y,j})
        s     = argmax over the 2k values [p_1..p_k, -p_1..-p_k]      (S = 2k subclasses)
        L     = CE( g(h^s), y * S + s )

    with ``g`` a linear head (an adapter of this distiller, dropped on export) from the
    student's embedding ``h^s`` to ``C * S`` logits. Returns the single term ``"loss"``.

    Online, not offline: the paper computes the PCA once on the teacher embeddings of the
    whole training set before training the student. A distiller sees batches only, so kdkit
    keeps per-class running moments (persistent buffers ``count``, ``mean``, ``m2``; exact
    over every training sample seen so far, augmentations included, merged across ranks)
    and refines the directions ``dirs`` by one subspace-iteration step per training batch;
    the teacher is frozen, so both converge to the offline PCA as training proceeds, but the
    labels of the first steps come from partial statistics. Eval batches update nothing.

    Other differences: the paper first projects each class's embeddings onto the null space
    of the teacher's classifier weights (removing what the logits already carry); kdkit sees
    only the teacher's logits and embedding, not its weights, and skips that projection. The
    subclass split here (sign / argmax of standardised projections) and the cross-entropy on
    hard (class, subclass) labels through an auxiliary head are kdkit's choices: the paper's
    student is trained on the pseudo-subclasses with its own expanded output layer. The
    defaults are kdkit's, not the paper's (which reports NLP few-class benchmarks, no CIFAR).

    Needs ``batch["label"]``.

    Args:
        weight: multiplier of the loss.
        directions: ``k`` principal directions per class; ``2k`` subclasses per class.
    """

    reads_labels = True  # the target class of each row

    @property
    def rank_synced_buffers(self) -> tuple[str, ...]:  # updated from every rank's gathered rows
        return ("count", "mean", "m2", "dirs") if self.head is not None else ()

    def __init__(self, weight: float = 1.0, directions: int = 2):
        super().__init__(weight)
        if directions < 1:
            raise KdkitError(f"lelp.directions must be >= 1, got {directions}")
        self.directions = int(directions)
        self.num_classes: int | None = None
        self.head: nn.Module | None = None

    @property
    def subclasses(self) -> int:
        return 2 * self.directions

    def build(self, student: Outputs, teacher: Outputs, context: DistillContext) -> None:
        h_s = require(student, "embedding", "lelp").flatten(1)
        h_t = require(teacher, "embedding", "lelp").flatten(1)
        c = teacher.logits.shape[1] if teacher.logits is not None else context.num_classes
        if c is None or c < 1:
            raise KdkitError("lelp needs the number of classes (teacher logits or context.num_classes)")
        d = h_t.shape[1]
        if self.directions > d:
            raise KdkitError(f"lelp.directions={self.directions} exceeds the teacher embedding width {d}")
        self.num_classes = int(c)
        self.head = nn.Linear(h_s.shape[1], self.num_classes * self.subclasses).to(h_s.device)
        dev = h_t.device
        self.register_buffer("count", torch.zeros(c, device=dev))
        self.register_buffer("mean", torch.zeros(c, d, device=dev))
        self.register_buffer("m2", torch.zeros(c, d, d, device=dev))
        start = torch.linalg.qr(torch.randn(c, d, self.directions, device=dev))[0]
        self.register_buffer("dirs", start)

    def _labels(self, batch: dict, n: int, device) -> Tensor:
        label = batch.get("label")
        if label is None:
            raise KdkitError("lelp needs batch['label'] (the class of each sample)")
        label = label.to(device).long()
        if label.shape != (n,):
            raise KdkitError(f"lelp: batch['label'] has shape {tuple(label.shape)}, expected ({n},)")
        return label

    @torch.no_grad()
    def update(self, h_t: Tensor, label: Tensor) -> None:
        """Add a batch (of every rank) to the class moments; one subspace-iteration step."""
        h_t, label = gather_nograd(h_t), gather_nograd(label)
        count, mean, m2 = merge_moments(self.count, self.mean, self.m2, h_t, label)
        self.count.copy_(count)
        self.mean.copy_(mean)
        self.m2.copy_(m2)
        self.dirs.copy_(subspace_step(self.covariance(), self.dirs))

    def covariance(self) -> Tensor:
        return self.m2 / self.count.clamp(min=1)[:, None, None]

    @torch.no_grad()
    def pseudo_labels(self, h_t: Tensor, label: Tensor) -> Tensor:
        """``y * S + s`` for every row (current statistics)."""
        var = torch.einsum("cdk,cde,cek->ck", self.dirs, self.covariance(), self.dirs)
        return label * self.subclasses + assign_subclasses(h_t, label, self.mean, self.dirs, var)

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        if self.head is None:
            raise RuntimeError("lelp: build() must run (on a probe forward) before forward()")
        h_s = require(student, "embedding", "lelp").flatten(1)
        # float32 statistics whatever the autocast: eigen-directions of a bf16 covariance drift.
        h_t = require(teacher, "embedding", "lelp").flatten(1).detach().float()
        label = self._labels(batch, h_t.shape[0], h_t.device)
        with torch.autocast(h_t.device.type, enabled=False):
            if self.training:
                self.update(h_t, label)
            target = self.pseudo_labels(h_t, label)
        return {"loss": F.cross_entropy(self.head(h_s).float(), target)}

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, directions={self.directions}, "
                f"subclasses={self.subclasses}, num_classes={self.num_classes}")
