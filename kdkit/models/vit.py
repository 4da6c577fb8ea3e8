"""Vision transformers as teachers or students: timm ViTs / DeiTs of any size, and open_clip's
visual tower as a classifier backbone.

* ``vit``: a timm ``VisionTransformer`` (Dosovitskiy et al., ICLR 2021) trained from scratch, sized
  from config (patch 4 on 32 x 32 CIFAR images: 64 patch tokens + CLS), optionally starting from a
  timm registry architecture (``vit_tiny_patch16_224``, ``deit_small_patch16_224``...). With
  ``distillation_token=True`` it is DeiT's distilled ViT (``DistilledViT``; Touvron et al.,
  "Training data-efficient image transformers & distillation through attention", ICML 2021).
* ``clip_visual_classifier``: an open_clip visual tower + a linear head (the text tower dropped).
* ``vit_token_layout``: where the patch tokens sit in a block's output, for token distillers.

Module names for feature taps. timm: ``blocks.<i>`` outputs ``[B, P + N, D]`` (``P`` prefix tokens:
CLS, then DeiT's distillation token; then ``N = h * w`` patch tokens, row-major), ``norm`` the final
norm, ``head`` (and ``head_dist``) the classifiers; ``"head:input"`` is the pooled embedding.
open_clip: ``visual.transformer.resblocks.<i>`` outputs ``[B, 1 + N, D]`` (batch first; CLS first).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from timm.models.deit import VisionTransformerDistilled
from torch import Tensor, nn

from kdkit.checkpoints import load_weights
from kdkit.errors import KdkitError, close_names

# Sizes of ``vit()`` without a registry name: a CIFAR ViT of ~0.5M parameters.
SCRATCH = {"img_size": 32, "patch_size": 4, "embed_dim": 128, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0}
# The registry architectures a nameless ``vit()`` is built from (only their defaults are used, and
# every size is overridden): timm then records the arguments (``model._model_args``), so the
# student exports as a timm folder that ``timm.create_model("local-dir:...")`` rebuilds.
BASE = "vit_tiny_patch16_224"
BASE_DISTILLED = "deit_tiny_distilled_patch16_224"
TIMM_MODULES = ("vision_transformer", "deit")  # timm modules whose models are VisionTransformers


class DistilledViT(VisionTransformerDistilled):
    """DeiT's ViT with a class and a distillation token (Touvron et al. 2021, Sec. 5), whose
    output follows the paper rather than timm's ``distilled_training`` switch.

    The class token feeds ``head``, the distillation token ``head_dist``; the module ``head_dist``
    runs in every mode, so a distiller can tap its logits ``psi(Z_dist)``. Eval mode returns the
    paper's inference, ``(head(z_cls) + head_dist(z_dist)) / 2``. In training, once a distiller
    that trains the distillation head on the teacher has said so (``train_distillation_head``, as
    the ``deit`` and ``cskd`` distillers do when they are built), the output is ``head(z_cls)``
    only, so the task's cross-entropy ``L_CE(psi(Z_s), y)`` trains the class head alone. Without
    such a distiller (the baseline stage) training returns the same average as eval, so the labels
    train both heads and eval never averages in an untrained head. The mode is read from
    ``self.training``, never from tensor values, so eval-mode ``torch.export`` / ONNX trace.

    Built by ``vit(..., distillation_token=True)``; any ``VisionTransformerDistilled`` argument
    works. Only ``forward_head`` differs from timm's class (same parameters and state dict).
    """

    def train_distillation_head(self, enabled: bool = True) -> None:
        """Whether a distiller trains ``head_dist`` on the teacher (see the class docstring)."""
        self.distilled_training = bool(enabled)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        cls, dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
        if pre_logits:
            return (cls + dist) / 2
        logits, logits_dist = self.head(cls), self.head_dist(dist)  # both hooks fire in both modes
        if self.training and self.distilled_training:
            return logits
        return (logits + logits_dist) / 2


def vit(num_classes: int, img_size: int | None = None, patch_size: int | None = None,
        embed_dim: int | None = None, depth: int | None = None, num_heads: int | None = None,
        mlp_ratio: float | None = None, name: str | None = None, distillation_token: bool = False,
        drop_path_rate: float = 0.0, checkpoint_path: str | os.PathLike | None = None,
        **kwargs) -> nn.Module:
    """A timm vision transformer (Dosovitskiy et al. 2021) built from scratch, sized from config.

    The image is cut into ``(img_size / patch_size)^2`` patches, each linearly embedded to
    ``embed_dim``; a CLS token (and with ``distillation_token`` DeiT's distillation token) is
    prepended, learned position embeddings added, ``depth`` pre-norm blocks (``num_heads`` heads,
    MLP ``mlp_ratio * embed_dim`` wide) applied, and the final-normed CLS token classified.

    Args:
        num_classes: classifier size.
        img_size: input side (square images); must be a multiple of ``patch_size``.
        patch_size: patch side in pixels.
        embed_dim: token width ``D``; a multiple of ``num_heads`` (head width ``D / num_heads``).
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width over ``embed_dim``.
        name: a timm registry architecture (``"vit_tiny_patch16_224"``, ``"deit_small_patch16_224"``,
            a ``deit_*_distilled_*`` one with ``distillation_token``) whose defaults the size
            arguments given here override; its weights are never downloaded. None: sizes default to
            ``SCRATCH`` (img 32, patch 4, 128 wide, 4 blocks, 4 heads, MLP ratio 2).
        distillation_token: a ``DistilledViT`` (DeiT): training mode returns the class head's logits,
            eval mode the mean of the class and distillation heads; tap ``head_dist`` for the latter.
        drop_path_rate: stochastic depth rate of the last block (linearly increasing from 0).
        checkpoint_path: local weights of this model, loaded with ``kdkit.checkpoints.load_weights``
            (state_dict, kdkit Lightning checkpoint or safetensors).
        **kwargs: other ``VisionTransformer`` arguments (``drop_rate``, ``qkv_bias``, ``in_chans``...).
    """
    import timm
    from timm.models import get_arch_name, is_model_in_modules
    from timm.models.vision_transformer import VisionTransformer

    sizes = {"img_size": img_size, "patch_size": patch_size, "embed_dim": embed_dim, "depth": depth,
             "num_heads": num_heads, "mlp_ratio": mlp_ratio}
    if name is None:
        base = BASE_DISTILLED if distillation_token else BASE
        sizes = {k: SCRATCH[k] if v is None else v for k, v in sizes.items()}
    else:
        base = str(name)
        known = timm.list_models(module=list(TIMM_MODULES))
        if not timm.is_model(base) or not is_model_in_modules(get_arch_name(base), TIMM_MODULES):
            raise KdkitError(f"unknown timm ViT {base!r}; close names: {close_names(base, known)}")
    overrides = {k: v for k, v in sizes.items() if v is not None}
    _check_sizes(overrides)
    try:
        model = timm.create_model(base, pretrained=False, num_classes=num_classes,
                                  drop_path_rate=drop_path_rate, **overrides, **kwargs)
    except (AssertionError, TypeError, ValueError) as err:  # timm asserts on sizes; TypeError: a typo'd kwarg
        raise KdkitError(f"timm could not build {base} with {dict(overrides, **kwargs)}: {err}") from None
    if not isinstance(model, VisionTransformer):
        raise KdkitError(f"timm model {base!r} is a {type(model).__name__}, not a VisionTransformer; "
                         f"pick one of: {close_names(base, timm.list_models(module=list(TIMM_MODULES)))}")
    distilled = isinstance(model, VisionTransformerDistilled)
    if distillation_token and not distilled:
        raise KdkitError(f"timm model {base!r} has no distillation token; with distillation_token=true "
                         f"use a DeiT distilled architecture: {', '.join(timm.list_models('deit_*distilled*'))}")
    if distilled and not distillation_token:
        raise KdkitError(f"timm model {base!r} has a distillation token: set distillation_token=true, "
                         f"or use {base.replace('_distilled', '')!r} for a plain ViT")
    if distilled:
        # timm's class with the paper's outputs: DistilledViT adds no state (only forward_head)
        model.__class__ = DistilledViT
    if checkpoint_path:
        load_weights(model, checkpoint_path, what="checkpoint_path")
    return model


def _check_sizes(sizes: Mapping) -> None:
    """One-line errors for sizes timm would only assert on (or silently crop)."""
    dim, heads = sizes.get("embed_dim"), sizes.get("num_heads")
    if dim is not None and heads is not None and dim % heads:
        fits = [h for h in range(1, min(dim, 16) + 1) if dim % h == 0]
        raise KdkitError(f"vit: embed_dim={dim} is not a multiple of num_heads={heads}; "
                         f"num_heads that fit: {fits}")
    img, patch = sizes.get("img_size"), sizes.get("patch_size")
    if isinstance(img, int) and isinstance(patch, int) and img % patch:
        fits = [p for p in range(1, img + 1) if img % p == 0]
        raise KdkitError(f"vit: img_size={img} is not a multiple of patch_size={patch} (the border "
                         f"would be cropped); patch sizes that fit: {fits}")


class ClipVisualClassifier(nn.Module):
    """An open_clip visual tower with a linear head: ``logits = head(visual(image))``.

    ``visual(image)`` is CLIP's image embedding (Radford et al. 2021): for a ViT tower the final-
    normed CLS token times ``proj``, not L2-normalised (as in the paper's linear probes). ``head``
    is a fresh ``nn.Linear(embed_dim, num_classes)``, so ``"auto"`` embedding taps (the input of
    the last ``nn.Linear``) give the image embedding.

    Args:
        visual: the tower (``open_clip.VisionTransformer``, ``ModifiedResNet`` or ``TimmModel``).
        embed_dim: the tower's output width.
        num_classes: classifier size.
    """

    def __init__(self, visual: nn.Module, embed_dim: int, num_classes: int):
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(int(embed_dim), int(num_classes))

    def forward(self, image: Tensor) -> Tensor:
        return self.head(self.visual(image))


def clip_visual_classifier(num_classes: int, model_name: str = "ViT-B-32",
                           model_config: Mapping | None = None, pretrained: str | None = None,
                           checkpoint_path: str | os.PathLike | None = None,
                           image_size: int | None = None, freeze: bool = False) -> ClipVisualClassifier:
    """A ``ClipVisualClassifier``: the visual tower of an open_clip model with a linear head.

    The CLIP model is built by ``kdkit.models.clip.clip_model``; its text tower is dropped at once.

    Args:
        num_classes: classifier size.
        model_name: open_clip model name (``ViT-B-32``...) or a kdkit tiny config
            (``kdkit-vit-p8-d64``...: ``conf/clip_models``).
        model_config: overrides deep-merged into the model's open_clip config, e.g.
            ``{"vision_cfg": {"layers": 2}}``.
        pretrained: CLIP weights for the tower: an open_clip pretrained tag (online only) or a local
            CLIP checkpoint (e.g. the ``student.pt`` of a kdkit image-text run). None: random init.
        checkpoint_path: local weights of this classifier (``visual.*`` and ``head.*``), loaded with
            ``kdkit.checkpoints.load_weights`` after ``pretrained``.
        image_size: override the tower's input side (position embeddings resized when loading).
        freeze: train the head only (a linear probe): the tower's parameters get no gradient.
    """
    from kdkit.models.clip import clip_model

    overrides = _clip_overrides(model_name, model_config)
    clip = clip_model(model_name, pretrained=pretrained, image_size=image_size, **overrides)
    embed_dim = int(clip.open_clip_model_cfg["embed_dim"])
    model = ClipVisualClassifier(clip.visual, embed_dim, num_classes)
    del clip  # the text tower goes with it
    if checkpoint_path:
        load_weights(model, checkpoint_path, what="checkpoint_path")
    if freeze:
        model.visual.requires_grad_(False)
    return model


def _clip_overrides(model_name: str, model_config: Mapping | None) -> dict:
    """Top-level open_clip config entries with ``model_config`` deep-merged in (open_clip's own
    ``create_model`` replaces whole entries such as ``vision_cfg``)."""
    if not model_config:
        return {}
    import open_clip

    from kdkit.models.clip import register_configs

    register_configs()
    base = open_clip.get_model_config(model_name) or {}  # unknown names: clip_model says so
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(model_config, resolve=True) if OmegaConf.is_config(model_config) else model_config
    return {str(key): _merged(base.get(key), value) for key, value in plain.items()}


def _merged(base, override):
    if isinstance(base, Mapping) and isinstance(override, Mapping):
        return {**base, **{k: _merged(base.get(k), v) for k, v in override.items()}}
    return override


def vit_token_layout(model: nn.Module) -> dict:
    """``{"prefix_tokens": P, "grid": (h, w), "dim": D}`` of a vision transformer's block outputs.

    A block's output ``[B, P + h * w, D]`` holds ``P`` prefix tokens, then the patch tokens in
    row-major order. timm ``VisionTransformer`` (``blocks.<i>``): ``P`` = CLS + distillation +
    register tokens (``num_prefix_tokens``). open_clip ``VisionTransformer``
    (``transformer.resblocks.<i>``, batch first): ``P = 1``, the CLS token first. A
    ``ClipVisualClassifier`` or CLIP model answers for its ``visual`` tower, open_clip's
    ``TimmModel`` for its timm ``trunk``. ``grid`` is for the configured ``img_size``.
    """
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    if isinstance(model, TimmViT):
        return {"prefix_tokens": int(model.num_prefix_tokens),
                "grid": tuple(int(s) for s in model.patch_embed.grid_size), "dim": int(model.embed_dim)}
    from open_clip.transformer import VisionTransformer as ClipViT

    if isinstance(model, ClipViT):
        if not getattr(model.transformer, "batch_first", True):  # older open_clip: [L, B, D]
            raise KdkitError("open_clip VisionTransformer runs sequence-first ([L, B, D]); kdkit's "
                             "token layout needs batch-first blocks (open_clip >= 2.21)")
        return {"prefix_tokens": 1, "grid": tuple(int(s) for s in model.grid_size),
                "dim": int(model.transformer.width)}
    for child in ("visual", "trunk"):
        if isinstance(getattr(model, child, None), nn.Module):
            return vit_token_layout(getattr(model, child))
    raise KdkitError(f"{type(model).__name__} is not a vision transformer (timm VisionTransformer or "
                     "open_clip VisionTransformer): it has no token layout")


__all__ = ["DistilledViT", "ClipVisualClassifier", "clip_visual_classifier", "vit", "vit_token_layout"]
