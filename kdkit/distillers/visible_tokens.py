"""MAE-style token dropping inside a ViT: after one of its modules, only the prefix tokens and
the visible patch tokens go on, so the blocks encode ``P + keep`` tokens instead of ``P + N``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdkit.errors import KdkitError


class VisibleTokens:
    """Drops a ViT's masked patch tokens after ``module`` (MAE's encoder input: He et al.,
    "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, Sec. 3).

    ``module`` is where the token sequence ``[B, P + N, D]`` is complete, position embeddings
    added and nothing encoded yet: timm ViTs' ``patch_drop`` (an identity unless
    ``patch_drop_rate`` is set), open_clip towers' ``visual.patch_dropout``. ``keep(visible)``
    arms the hook for the model's *next* forward only: that forward continues with the ``P``
    prefix tokens and, per sample, its visible patch tokens in their row-major order, so
    ``[B, P + keep, D]`` with ``keep`` visible patches in every row. Any other forward (the probe,
    evaluation, a forward nobody armed) sees every token: the hook is a no-op then.

    The hook holds this object, not the reverse, so the model stays the model's: it is removed
    with ``remove()``. A module that drops patches itself (timm's / open_clip's ``PatchDropout``
    with a rate) is refused, since its own random drop would stack on the mask.
    """

    def __init__(self, module: nn.Module, prefix_tokens: int, num_patches: int, who: str):
        rate = getattr(module, "prob", 0.0)
        if rate:
            raise KdkitError(f"{who}: the student's {type(module).__name__} already drops patch tokens "
                             f"(rate {rate}); set its patch dropout to 0 to drop masked tokens instead")
        self.prefix_tokens, self.num_patches, self.who = int(prefix_tokens), int(num_patches), who
        self._pending: Tensor | None = None
        self._handle = module.register_forward_hook(self._drop)

    def keep(self, visible: Tensor) -> None:
        """Arm the next forward: ``visible`` bool ``[B, N]`` (True: the patch goes on), the same
        number of True in every row."""
        counts = visible.sum(1)
        if visible.dim() != 2 or visible.shape[1] != self.num_patches or bool((counts != counts[0]).any()):
            raise KdkitError(f"{self.who}: a token mask must be [B, {self.num_patches}] with as many visible "
                             f"patches in every row, got shape {tuple(visible.shape)}")
        self._pending = visible

    def _drop(self, module: nn.Module, inputs, x: Tensor) -> Tensor | None:
        visible, self._pending = self._pending, None
        if visible is None:
            return None
        p, n = self.prefix_tokens, self.num_patches
        if x.dim() != 3 or x.shape[1] != p + n or x.shape[0] != visible.shape[0]:
            raise KdkitError(f"{self.who}: expected tokens [{visible.shape[0]}, {p} + {n}, D] after the "
                             f"token-dropping module, got {tuple(x.shape)}")
        patches = x[:, p:]
        kept = patches[visible.to(x.device)].view(x.shape[0], -1, x.shape[2])  # row-major per sample
        return torch.cat([x[:, :p], kept], dim=1)

    def remove(self) -> None:
        self._handle.remove()
        self._pending = None

