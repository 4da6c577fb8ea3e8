"""Contrastive losses over the global batch: CLIP's symmetric InfoNCE and its building blocks.

Every loss here follows one convention for N processes: each rank scores its *local* rows
against the columns of the *global* batch (``kdkit.distributed.gather``, which sends gradients
back to the rank that owns a column) and averages over its local rows. DDP's gradient averaging
then yields exactly the gradient of the same loss on one process with the whole global batch.

The image-text task uses ``contrastive_loss`` as its task loss; the CLIP distillers
(``kdkit.distillers.clip_icl``, ``affinity``) reuse the same pieces against teacher embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.distributed import gather


def global_targets(local: Tensor, offset: int) -> Tensor:
    """Column index of each local row's own pair in the gathered (global) batch."""
    return torch.arange(local.shape[0], device=local.device) + offset


def contrastive_loss(image: Tensor, text: Tensor, scale: Tensor | float,
                     image_columns: Tensor | None = None,
                     text_columns: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE of CLIP (Radford et al. 2021) over the global batch.

    L = 1/2 [CE(s * v_i . t_j, j = i) + CE(s * t_i . v_j, j = i)], rows i local, columns j global.
    ``image_columns`` / ``text_columns`` default to the gathered ``image`` / ``text`` themselves
    (the CLIP loss); pass the teacher's embeddings for CLIP-KD's interactive contrastive loss.
    """
    image_columns, offset = gather(image if image_columns is None else image_columns)
    text_columns, _ = gather(text if text_columns is None else text_columns)
    targets = global_targets(image, offset)
    i2t = F.cross_entropy(scale * image @ text_columns.T, targets)
    t2i = F.cross_entropy(scale * text @ image_columns.T, targets)
    return (i2t + t2i) / 2


def similarity_rows(rows: Tensor, columns: Tensor, scale: Tensor | float) -> Tensor:
    """``scale * rows @ gather(columns).T``: local rows scored against global columns."""
    all_columns, _ = gather(columns)
    return scale * rows @ all_columns.T
