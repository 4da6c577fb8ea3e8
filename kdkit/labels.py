"""The one convention for samples without a label: ``label == UNLABELED`` (-1).

Transfer data (Bucilua et al. 2006; Hinton et al. 2015) mixes labelled samples with samples the
student learns from through teacher outputs alone. Such samples travel in the same batches with
``label = -1``; the task loss skips them and the distillers see them like any other sample.
"""

from __future__ import annotations

import torch
from torch import Tensor

UNLABELED = -1


def labeled(labels: Tensor) -> Tensor:
    """Bool mask of the rows that carry a label."""
    return labels != UNLABELED


def hide(labels: Tensor, keep: Tensor) -> Tensor:
    """``labels`` with every row outside the bool mask ``keep`` set to ``UNLABELED``."""
    return torch.where(keep, labels, torch.full_like(labels, UNLABELED))
