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
    ``patch_drop_rate`` is set), open_clip towers' ``visual.patch_dropout``. ``keep(index)``
    arms the hook for the model's *next* forward only: that forward continues with the ``P``
    prefix tokens and, per sample, the patch tokens ``index`` names, in that order, so
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

    def keep(self, index: Tensor) -> None:
        """Arm the next forward: ``index`` long ``[B, keep]``, the patches (0..N-1) each row keeps
        (ascending for row-major order). Only its shape is checked: reading its values would
        wait for the device."""
        if index.dim() != 2 or not 0 < index.shape[1] <= self.num_patches:
            raise KdkitError(f"{self.who}: visible-patch indices must be [B, keep] with 0 < keep <= "
                             f"{self.num_patches}, got shape {tuple(index.shape)}")
        self._pending = index

    def _drop(self, module: nn.Module, inputs, x: Tensor) -> Tensor | None:
        index, self._pending = self._pending, None
        if index is None:
            return None
        p, n = self.prefix_tokens, self.num_patches
        if x.dim() != 3 or x.shape[1] != p + n or x.shape[0] != index.shape[0]:
            raise KdkitError(f"{self.who}: expected tokens [{index.shape[0]}, {p} + {n}, D] after the "
                             f"token-dropping module, got {tuple(x.shape)}")
        index = index.to(x.device)[..., None].expand(-1, -1, x.shape[2])
        return torch.cat([x[:, :p], torch.gather(x[:, p:], 1, index)], dim=1)

    def remove(self) -> None:
        self._handle.remove()
        self._pending = None

