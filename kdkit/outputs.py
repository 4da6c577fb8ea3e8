"""The one shape every model output takes inside kdkit."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Outputs:
    """What a task extracts from one model on one batch.

    Args:
        logits: class scores ``[B, C]`` (classification, node classification).
        embedding: the main pooled representation ``[B, D]`` (pre-logit features for vision,
            image embedding for CLIP, query embedding for retrieval, hidden node embedding).
        features: intermediate activations by module name (``"layer3"``), as asked for by a
            distiller, and other named tensors a task produces (``"text_embedding"``).
    """

    logits: Tensor | None = None
    embedding: Tensor | None = None
    features: dict[str, Tensor] = field(default_factory=dict)

    def flat(self) -> dict[str, Tensor]:
        """Flat name -> tensor view, used by the teacher-output cache."""
        out = {f"features.{k}": v for k, v in self.features.items()}
        if self.logits is not None:
            out["logits"] = self.logits
        if self.embedding is not None:
            out["embedding"] = self.embedding
        return out

    @classmethod
    def from_flat(cls, flat: dict[str, Tensor]) -> Outputs:
        feats = {k[len("features.") :]: v for k, v in flat.items() if k.startswith("features.")}
        return cls(logits=flat.get("logits"), embedding=flat.get("embedding"), features=feats)

    def map(self, fn) -> Outputs:
        """Apply ``fn`` to every tensor (dtype casts, detaching, device moves)."""
        return Outputs.from_flat({k: fn(v) for k, v in self.flat().items()})

    def rows(self, index: Tensor) -> Outputs:
        """The outputs of the samples ``index`` (long row indices or a bool mask) of the batch;
        scalars (e.g. a CLIP model's ``logit_scale``) belong to no sample and stay as they are."""
        return self.map(lambda t: t[index] if t.dim() else t)

    def float(self) -> Outputs:
        return self.map(lambda t: t.float() if torch.is_floating_point(t) else t)
