"""A multi-exit retrieval student evaluated and exported cut at each exit.

A student trained with exits (``kdkit.distillers.multi_exit``) is one model that can be cut
after any of its blocks. ``ExitEvaluation`` scores each cut in the same evaluation pass as the
whole model: every corpus and query text is encoded once (``TextEncoder.forward_exits``) and
each exit's embeddings are searched on their own, giving ``<metric>@exit<k>`` (e.g.
``ndcg@10@exit0``: the student cut after block 0). ``save_exits`` writes each cut as its own
sentence-transformers folder (``export/exit<k>/``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from kdkit.errors import KdkitError
from kdkit.retrieval_metrics import retrieval_metrics


def check_exits(exits: Sequence[int] | None, num_layers: int, option: str) -> list[int]:
    """``exits`` as sorted distinct block indices of a ``num_layers``-block student (a clear
    error for one it does not have)."""
    exits = sorted({int(k) for k in exits or ()})
    bad = [k for k in exits if not 0 <= k < num_layers]
    if bad:
        raise KdkitError(f"{option}={bad}: the student has blocks 0..{num_layers - 1} "
                         f"(exit k = the student cut after block k)")
    return exits


class ExitEvaluation:
    """Retrieval metrics of the student cut at each of ``exits``, beside the whole model's.

    Args:
        exits: 0-based block indices; the last block is the whole model.
        metric_names, search_backend: as the task's (``kdkit.retrieval_metrics``).
    """

    def __init__(self, exits: Sequence[int], metric_names: Sequence[str], search_backend: str = "torch"):
        self.exits = sorted({int(k) for k in exits})
        self.metric_names = list(metric_names)
        self.search_backend = search_backend
        self._parts: dict[str, list[tuple[Tensor, Tensor]]] = {}

    def start(self, stage: str) -> None:
        self._parts[stage] = []

    def encode(self, stage: str, model: Callable, index: Tensor, input_ids: Tensor,
               attention_mask: Tensor) -> Tensor:
        """The whole model's embeddings of these rows (returned) and each exit's (kept)."""
        final, per_exit = model.forward_exits(input_ids, attention_mask, self.exits)
        stacked = torch.stack([per_exit[k] for k in self.exits], dim=1)  # [N, E, D]
        self._parts.setdefault(stage, []).append((index.cpu(), stacked.float().cpu()))
        return final

    def metrics(self, stage: str, doc_ids: Sequence[str], query_ids: Sequence[str],
                qrels: dict) -> dict[str, float]:
        """``<metric>@exit<k>`` over the rows encoded this pass (gathered across ranks)."""
        from kdkit.tasks.retrieval import _gather_rows

        index, emb = _gather_rows(self._parts.pop(stage, []))
        if not len(index):
            return {}
        order = index.argsort()
        index, emb = index[order], emb[order]
        is_doc = index < len(doc_ids)
        d_ids = [doc_ids[i] for i in index[is_doc].tolist()]
        q_ids = [query_ids[i - len(doc_ids)] for i in index[~is_doc].tolist()]
        if not d_ids or not q_ids:
            return {}
        q_qrels = {q: qrels[q] for q in q_ids}
        out = {}
        for j, k in enumerate(self.exits):
            found = retrieval_metrics(emb[~is_doc, j], emb[is_doc, j], q_ids, d_ids, q_qrels, self.metric_names,
                                      self.search_backend)
            out.update({f"{name}@exit{k}": value for name, value in found.items()})
        return out


def save_exits(student, directory, exits: Sequence[int]) -> list[Path]:
    """``student`` cut after each block in ``exits``, each saved as a sentence-transformers
    folder ``<directory>/exit<k>`` (``kdkit.models.text_layers.cut_at_exit``)."""
    from kdkit.models.text_layers import cut_at_exit

    paths = []
    for k in check_exits(exits, student.num_layers, "export_exits"):
        paths.append(Path(cut_at_exit(student, k).save_pretrained(Path(directory) / f"exit{k}")))
    return paths
