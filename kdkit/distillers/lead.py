"""LEAD: layer-wise alignment of in-batch score distributions between teacher and student."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.distillers.base import Distiller
from kdkit.distillers.listwise import listwise_kl
from kdkit.distributed import gather, gather_nograd
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs
from kdkit.distillers.layer_names import EVERY, by_layer, layer_feature


def pick_layers(candidates: Sequence[int], k: int, generator: torch.Generator) -> list[int]:
    """``k`` of ``candidates`` drawn uniformly without replacement, in increasing order."""
    order = torch.randperm(len(candidates), generator=generator)[:k]
    return sorted(candidates[i] for i in order.tolist())


class Lead(Distiller):
    """LEAD: liberal feature-based distillation for dense retrieval (Sun et al., WSDM 2024,
    "LEAD: Liberal Feature-based Distillation for Dense Retrieval").

    Instead of matching hidden states (which needs equal widths, tokenizers, layer counts),
    LEAD matches, layer by layer, the distribution of query-passage similarities over the
    batch's passages computed from that layer's sentence embedding. Every ``resample_every``
    steps it draws ``num_layers`` student layers and ``num_layers`` teacher layers at random
    ("liberal" layer selection), sorts both and pairs them in order; each pair ``(l, m)``
    contributes

        KL_l = (1/B) sum_i KL( softmax_j(<q^t_i, p^t_j>_m / tau_t) || softmax_j(<q^s_i, p^s_j>_l / tau) )

    over every passage ``j`` of the global batch (positives, hard and in-batch negatives,
    gathered across ranks), and the layers are re-weighted by how well the teacher layer
    ranks the positives (``reweight``): ``lambda = softmax_m(-NLL_m / T_layer)`` with
    ``NLL_m`` the cross-entropy of the teacher layer's scores at the positive, detached:

        L = sum_l lambda_l KL_l        (reweight: false -> (1/k) sum_l KL_l)

    What kdkit implements differently from the paper's code (SimXNS/LEAD): a layer's
    embedding is the encoder's own pooling (mean for MiniLM, [CLS] for [CLS] models), with its
    projection and normalisation -- the paper takes the raw [CLS] state -- so both softmaxes
    take a temperature (cosine scores in [-1, 1]; the paper's student softmax has none);
    layers are drawn again every ``resample_every`` optimizer steps from a seeded generator
    (the paper redraws at every checkpoint), so every rank draws the same layers; the
    final-layer KL and the student's own contrastive loss of the paper's objective are other
    kdkit terms (``listwise`` distiller, ``task_loss_weight``): use them beside LEAD, as the
    paper does -- alone, LEAD leaves the blocks above the drawn layers without gradient, which
    DDP without ``find_unused_parameters`` rejects. The teacher must run live (its table holds
    final embeddings only), so it needs the student's tokenizer.

    Reads ``features["query@k"]`` and ``features["passage@k"]`` of both models
    (``kdkit.tasks.retrieval_layers``): tuples, ``data.stream=tuples`` or ``both``. Returns
    ``"loss"``.

    Args:
        weight: multiplier of the loss.
        num_layers: layers aligned per step (k).
        student_layers, teacher_layers: candidate blocks (0-based); None: every block.
        temperature: tau of the student's softmax.
        teacher_temperature: tau_t of the teacher's softmax (None: ``temperature``).
        reweight: weight the pairs by the teacher layers' NLL (True) or equally.
        layer_temperature: T_layer of that weighting.
        resample_every: optimizer steps between two layer draws.
        seed: seed of the draws (draw n uses seed and n: resumable, equal on every rank).
    """

    def __init__(self, weight: float = 1.0, num_layers: int = 2, student_layers: Sequence[int] | None = None,
                 teacher_layers: Sequence[int] | None = None, temperature: float = 0.05,
                 teacher_temperature: float | None = None, reweight: bool = True, layer_temperature: float = 1.0,
                 resample_every: int = 100, seed: int = 0):
        super().__init__(weight)
        if int(num_layers) < 1:
            raise KdkitError(f"lead.num_layers={num_layers}: align at least one layer")
        if temperature <= 0 or (teacher_temperature is not None and teacher_temperature <= 0) or layer_temperature <= 0:
            raise KdkitError("lead temperatures must be > 0")
        if int(resample_every) < 1:
            raise KdkitError(f"lead.resample_every={resample_every}: use >= 1 step")
        self.num_layers = int(num_layers)
        self.student_layers = None if student_layers is None else sorted({int(k) for k in student_layers})
        self.teacher_layers = None if teacher_layers is None else sorted({int(k) for k in teacher_layers})
        for name, layers in (("student_layers", self.student_layers), ("teacher_layers", self.teacher_layers)):
            if layers is not None and len(layers) < self.num_layers:
                raise KdkitError(f"lead.{name}={layers}: fewer than num_layers={self.num_layers} candidates")
        self.temperature = float(temperature)
        self.teacher_temperature = float(teacher_temperature or temperature)
        self.reweight = bool(reweight)
        self.layer_temperature = float(layer_temperature)
        self.resample_every = int(resample_every)
        self.seed = int(seed)

    @staticmethod
    def _names(layers: list[int] | None) -> list[str]:
        return [layer_feature(f, k) for f in ("query", "passage") for k in (layers if layers is not None else [EVERY])]

    @property
    def student_features(self) -> list[str]:
        return self._names(self.student_layers)

    @property
    def teacher_features(self) -> list[str]:
        return self._names(self.teacher_layers)

    def _layers(self, outputs: Outputs, role: str) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        q, p = by_layer(outputs, "query"), by_layer(outputs, "passage")
        if not q or set(q) != set(p):
            raise KdkitError(f"lead needs the {role}'s per-layer query and passage embeddings "
                             "(a retrieval task with data.stream=tuples or both)")
        if len(q) < self.num_layers:
            raise KdkitError(f"lead.num_layers={self.num_layers}, but the {role} offers layers {sorted(q)}")
        return q, p

    def build(self, student: Outputs, teacher: Outputs, context) -> None:
        sq, sp = self._layers(student, "student")
        tq, tp = self._layers(teacher, "teacher")
        s_groups, t_groups = next(iter(sp.values())).shape[:2], next(iter(tp.values())).shape[:2]
        if s_groups != t_groups:
            raise KdkitError(f"lead: passage groups {tuple(s_groups)} (student) != {tuple(t_groups)} (teacher)")

    def draw(self, student_candidates: Sequence[int], teacher_candidates: Sequence[int]) -> tuple[list[int], list[int]]:
        """The layer pairs of the current step: draw number ``step // resample_every``."""
        draw = self.progress[1] // self.resample_every
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + draw)
        return (pick_layers(list(student_candidates), self.num_layers, generator),
                pick_layers(list(teacher_candidates), self.num_layers, generator))

    def forward(self, student: Outputs, teacher: Outputs, batch: dict) -> dict[str, Tensor]:
        sq, sp = self._layers(student, "student")
        tq, tp = self._layers(teacher, "teacher")
        # another distiller may ask for more layers than these candidates
        s_sel, t_sel = self.draw(self.student_layers or sorted(sq), self.teacher_layers or sorted(tq))
        b, g = next(iter(sp.values())).shape[:2]
        kls, nlls = [], []
        for ls, lt in zip(s_sel, t_sel):
            s_all, offset = gather(sp[ls].reshape(b * g, -1))
            t_all = gather_nograd(tp[lt].reshape(b * g, -1).float())
            kls.append(listwise_kl(sq[ls], s_all, tq[lt], t_all, self.temperature, self.teacher_temperature))
            if self.reweight:
                positives = offset + torch.arange(b, device=s_all.device) * g
                t_scores = tq[lt].float() @ t_all.T / self.teacher_temperature
                nlls.append(F.cross_entropy(t_scores, positives))
        kl = torch.stack(kls)
        if not self.reweight:
            return {"loss": kl.mean()}
        lam = torch.softmax(-torch.stack(nlls).detach() / self.layer_temperature, dim=0)
        return {"loss": (lam * kl).sum()}

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, num_layers={self.num_layers}, student_layers={self.student_layers}, "
                f"teacher_layers={self.teacher_layers}, temperature={self.temperature}, "
                f"teacher_temperature={self.teacher_temperature}, reweight={self.reweight}")
