"""Evaluation of image-text embeddings: zero-shot accuracy and retrieval Recall@k, DDP-safe."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric


class EvalEmbeddings(Metric):
    """Collects evaluation embeddings; ``compute`` returns them from every rank, de-duplicated.

    torchmetrics gathers the "cat" states across ranks (uneven sizes included). Lightning's
    DistributedSampler pads the last rank with repeated samples, so rows are de-duplicated by
    dataset ``index`` and sorted by it: the result is the same on 1 or N processes.
    """

    full_state_update = False

    def __init__(self):
        super().__init__()
        for name in ("image", "text", "index", "pair_id", "label"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, image: Tensor, text: Tensor, index: Tensor, pair_id: Tensor, label: Tensor) -> None:
        self.image.append(image.detach())
        self.text.append(text.detach())
        self.index.append(index.detach().long())
        self.pair_id.append(pair_id.detach().long())
        self.label.append(label.detach().long())

    def compute(self) -> dict[str, Tensor]:
        data = {name: _cat(getattr(self, name)) for name in ("image", "text", "index", "pair_id", "label")}
        order = torch.argsort(data["index"], stable=True)
        data = {k: v[order] for k, v in data.items()}
        keep = torch.ones_like(data["index"], dtype=torch.bool)
        keep[1:] = data["index"][1:] != data["index"][:-1]
        return {k: v[keep] for k, v in data.items()}


def _cat(value) -> Tensor:
    if isinstance(value, Tensor):  # already concatenated by torchmetrics' sync
        return value
    return torch.cat(value) if value else torch.empty(0)


def zero_shot_accuracy(image: Tensor, class_embeddings: Tensor, labels: Tensor) -> Tensor:
    """Fraction of images whose most similar class text embedding is their label's."""
    pred = (image @ class_embeddings.to(image).T).argmax(-1)
    return (pred == labels).float().mean()


@torch.no_grad()
def recall_at_k(queries: Tensor, gallery: Tensor, query_ids: Tensor, gallery_ids: Tensor,
                ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict[int, Tensor]:
    """Recall@k: the fraction of queries with an item of the same id among their k nearest.

    Args:
        queries: [Q, D] normalised embeddings; gallery: [G, D].
        query_ids, gallery_ids: which items match (equal ids), e.g. the image a caption
            belongs to, or the class for class-level retrieval.
        ks: cut-offs; chunk: queries scored at once (bounds memory at chunk x G).
    """
    top = min(max(ks), gallery.shape[0])
    hits = {k: torch.zeros((), device=queries.device) for k in ks}
    for start in range(0, queries.shape[0], chunk):
        q = queries[start:start + chunk]
        nearest = (q @ gallery.T).topk(top, dim=-1).indices
        match = gallery_ids[nearest] == query_ids[start:start + chunk, None]
        for k in ks:
            hits[k] += match[:, :k].any(-1).sum()
    return {k: v / max(1, queries.shape[0]) for k, v in hits.items()}
