"""Task losses: pure functions on tensors that a task (and any distiller) can use as its own
objective, e.g. CLIP's contrastive loss over the global batch (``kdkit.losses.contrastive``)."""

from kdkit.losses.contrastive import contrastive_loss

__all__ = ["contrastive_loss"]
