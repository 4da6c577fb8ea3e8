"""Contrastive losses over the global batch: CLIP's symmetric InfoNCE and its building blocks.

Every loss here follows one convention for N processes: each rank scores its *local* rows
against the columns of the *global* batch (``kdkit.distributed.gather``, which sends gradients
back to the rank that owns a column) and averages over its local rows. DDP's gradient averaging
then yields exactly the gradient of the same loss on one process with the whole global batch.

The image-text task uses ``contrastive_loss`` as its task loss; the CLIP distillers
(``kdkit.distillers.clip_icl``, ``affinity``) reuse the same pieces against teacher embeddings.

Transfer data (``kdkit.datamodules.transfer``) puts images without a caption in the batch,
flagged by ``batch["captioned"] = False`` (their ``text`` is padding). ``keep`` masks say which
rows and columns a loss may use; a masked mean divides by the global count of kept rows over the
world size, so that the DDP gradient average still equals the one-process loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.distributed import gather, gather_nograd, world


def global_targets(local: Tensor, offset: int) -> Tensor:
    """Column index of each local row's own pair in the gathered (global) batch."""
    return torch.arange(local.shape[0], device=local.device) + offset


def contrastive_loss(image: Tensor, text: Tensor, scale: Tensor | float,
                     image_columns: Tensor | None = None,
                     text_columns: Tensor | None = None,
                     keep: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE of CLIP (Radford et al. 2021) over the global batch.

    L = 1/2 [CE(s * v_i . t_j, j = i) + CE(s * t_i . v_j, j = i)], rows i local, columns j global.
    ``image_columns`` / ``text_columns`` default to the gathered ``image`` / ``text`` themselves
    (the CLIP loss); pass the teacher's embeddings for CLIP-KD's interactive contrastive loss.
    ``keep`` (bool ``[B]``, e.g. ``batch["captioned"]``): the loss of the kept pairs alone, rows
    and columns, as if the others were not in the batch (None: every pair).
    """
    image_columns, offset = gather(image if image_columns is None else image_columns)
    text_columns, _ = gather(text if text_columns is None else text_columns)
    targets = global_targets(image, offset)
    i2t = scale * image @ text_columns.T
    t2i = scale * text @ image_columns.T
    if keep is None:
        return (F.cross_entropy(i2t, targets) + F.cross_entropy(t2i, targets)) / 2
    columns = gather_nograd(keep)
    per_row = (F.cross_entropy(mask_columns(i2t, columns), targets, reduction="none")
               + F.cross_entropy(mask_columns(t2i, columns), targets, reduction="none")) / 2
    return masked_mean(per_row, keep)


def mask_columns(logits: Tensor, keep: Tensor | None) -> Tensor:
    """``logits`` with the columns outside ``keep`` (bool, one per column) at the dtype's lowest
    value: no probability, and still finite, so a row with every column masked (all weights 0
    downstream) gives no NaN gradient as -inf would."""
    if keep is None:
        return logits
    return logits.masked_fill(~keep.to(logits.device), torch.finfo(logits.dtype).min)


def masked_mean(per_row: Tensor, keep: Tensor | None) -> Tensor:
    """Mean of ``per_row`` over the kept rows of the global batch, as this rank's share: the sum
    of its kept rows over (global kept count / world size), so DDP's average over ranks is the
    global mean. Rows outside ``keep`` add nothing; 0 when no row is kept."""
    if keep is None:
        return per_row.mean()
    keep = keep.to(per_row.device)
    count = gather_nograd(keep.sum().reshape(1)).sum().float() / world()[1]
    return torch.where(keep, per_row, torch.zeros_like(per_row)).sum() / count.clamp(min=1)


def similarity_rows(rows: Tensor, columns: Tensor, scale: Tensor | float) -> Tensor:
    """``scale * rows @ gather(columns).T``: local rows scored against global columns."""
    all_columns, _ = gather(columns)
    return scale * rows @ all_columns.T
