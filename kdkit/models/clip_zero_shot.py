"""A CLIP model as an image classifier through its zero-shot head (class-name prompts).

CLIP zero-shot classification (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision", Sec. 3.1.2 and 3.1.4): every class name is written into prompt
templates ("a photo of a {}."), the text tower embeds the prompts, the L2-normalised embeddings
of one class are averaged over the templates and normalised again (prompt ensembling), and an
image's logits are the scaled cosine similarities of its image embedding with these class
embeddings. This turns an open_clip model into a ``model(images) -> logits [B, C]`` network, so
it can teach an image classifier (e.g. a CIFAR-10 resnet8) as in DHO / VL2V-ADiP.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.errors import KdkitError
from kdkit.models.clip import class_text_embeddings

PREFIX = "clip."  # where the wrapped open_clip model sits in the wrapper's module tree


class ZeroShotHead(nn.Linear):
    """``logits = scale * x @ class_embeddings.T (+ bias)``: a linear layer without parameters of
    its own, whose weight (the class text embeddings, times the logit scale) is given at each call.

    It is an ``nn.Linear`` so that kdkit's ``"auto"`` embedding (the *input* of a model's last
    ``nn.Linear``, see ``kdkit.features.last_linear``) is the teacher's L2-normalised image
    embedding ``[B, D]``, not a hidden state of the text tower (whose last ``nn.Linear`` would
    otherwise be the last one registered).
    """

    def __init__(self, in_features: int, out_features: int):
        nn.Module.__init__(self)  # not nn.Linear.__init__: no weight / bias parameters
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)

    def reset_parameters(self) -> None:  # nothing to initialise
        pass

    def forward(self, x: Tensor, class_embeddings: Tensor, scale: Tensor,  # type: ignore[override]
                bias: Tensor | None = None) -> Tensor:
        logits = scale * (x @ class_embeddings.T)
        return logits if bias is None else logits + bias


class ZeroShotClassifier(nn.Module):
    """An open_clip model as a classifier: ``forward(images) -> logits [B, C]`` (Radford et al.
    2021, zero-shot classification with prompt ensembling).

    ``logits = exp(logit_scale) * normalize(encode_image(images)) @ normalize(T).T`` (plus
    ``logit_bias`` for SigLIP models), where row ``c`` of ``T`` is the mean over ``templates``
    of the normalised text embeddings of ``template.format(class_names[c])``, re-normalised.
    ``C = len(class_names)``, so a class list that does not fit the data is caught by the task's
    output check (logits' C vs ``data.num_classes``).

    What the teacher sees: the classifier's images, resized to this CLIP's input size and
    normalised with its own preprocessing statistics (``image_size``, ``mean``, ``std``, from the
    open_clip model's preprocess config) by the task: give them to the task as the teacher's
    ``image_size`` / ``normalize`` input options. Its text tower only ever sees the prompts.

    Class text embeddings follow the *current* weights (the runner loads ``teacher.ckpt_path``
    after building the model): see ``class_embeddings``.

    State dict: the keys are exactly the wrapped CLIP model's (no ``clip.`` prefix), so a bare
    open_clip ``state_dict`` (kdkit's ``teacher.pt`` / ``student.pt`` of a CLIP run) loads into
    the wrapper, and the wrapper's ``state_dict`` loads into ``clip_model(pretrained=...)``.
    Keys with the ``clip.`` prefix (``named_parameters`` names) load too.

    Args:
        clip: an open_clip ``CLIP`` / ``CustomTextCLIP`` (``encode_image``, ``encode_text``,
            ``logit_scale``).
        class_names: class names in label order.
        templates: prompt templates with exactly one ``{}`` each.
        tokenizer: list[str] -> ``[N, L]`` token ids, the tokenizer of ``clip`` at its
            context length (``kdkit.models.clip.clip_tokenizer``).
        prompt_batch_size: prompts encoded at once when computing the class embeddings.
    """

    def __init__(self, clip: nn.Module, class_names: Sequence[str], templates: Sequence[str],
                 tokenizer: Callable[[list[str]], Tensor], prompt_batch_size: int = 1024):
        super().__init__()
        names = _names(class_names)
        self.class_names: tuple[str, ...] = names
        self.templates: tuple[str, ...] = _templates(templates)
        self.tokenizer = tokenizer
        self.prompt_batch_size = max(1, int(prompt_batch_size))
        self.clip = clip
        from kdkit.models.clip import preprocess_stats

        stats = preprocess_stats(clip)
        self.image_size: tuple[int, int] | None = stats["size"]  # (H, W) the CLIP reads
        self.mean: tuple[float, ...] = stats["mean"]  # its per-channel input normalisation
        self.std: tuple[float, ...] = stats["std"]
        dim = getattr(getattr(clip, "visual", None), "output_dim", None) or 0
        self.head = ZeroShotHead(dim, len(names))  # registered last: see ZeroShotHead
        self._cache: tuple[tuple, Tensor] | None = None
        self.register_state_dict_post_hook(_bare_keys)
        _register_load_pre_hook(self, _accept_bare_keys)
        self.register_load_state_dict_post_hook(_invalidate_after_load)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_options(self) -> dict:
        """This teacher's own input pipeline in the config's format (``normalize``,
        ``image_size``), e.g. for a runner that fills a teacher's null input keys."""
        return {"normalize": {"mean": list(self.mean), "std": list(self.std)},
                "image_size": list(self.image_size) if self.image_size else None}

    # ---- class text embeddings ----------------------------------------------------------------
    # Caching scheme. The [C, D] class embeddings cost C x T text forwards, so they are computed
    # lazily (at the first forward, not at construction: the runner loads the teacher's weights
    # after building it) and kept with a key of the text-side weights: for every parameter and
    # buffer outside the image tower, (data_ptr, version counter, dtype, device). Every in-place
    # write to a tensor bumps its version counter (load_state_dict's copy_, optimizer steps,
    # edits under no_grad), and .to() / .half() / load_state_dict(assign=
    # True) / param.data = ... change data_ptr or dtype, so a stale cache is never used; checking
    # the key is ~100 attribute reads per forward, nothing next to the image tower. Besides that,
    # the cache is dropped explicitly after load_state_dict (post hook) and on every train() /
    # eval() call. A writer that bypasses version counters (param.data.copy_(...)) must call
    # invalidate(). When the text tower needs gradients (training this wrapper with grad
    # enabled), the embeddings are recomputed with the graph at every forward and not cached.

    def invalidate(self) -> None:
        """Forget the cached class embeddings (recomputed at the next forward)."""
        self._cache = None

    def train(self, mode: bool = True) -> ZeroShotClassifier:
        self.invalidate()
        return super().train(mode)

    def _text_tensors(self):
        for name, child in self.clip.named_children():
            if name != "visual":
                yield from child.parameters()
                yield from child.buffers()
        yield from self.clip.parameters(recurse=False)
        yield from self.clip.buffers(recurse=False)

    def _weights_key(self) -> tuple | None:
        """None when a weight is an inference tensor (made under torch.inference_mode): those
        have no version counter, so nothing is cached for them."""
        key = []
        for t in self._text_tensors():
            if t.is_inference():
                return None
            key.append((t.data_ptr(), t._version, t.dtype, t.device))
        return tuple(key)

    def _text_needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self._text_tensors()
                                               if isinstance(p, nn.Parameter))

    def _device(self) -> torch.device:
        tensor = next(iter(self._text_tensors()), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    def encode_classes(self) -> Tensor:
        """``[C, D]`` float32 class embeddings from the current weights (no cache), with the
        autograd graph when grad is enabled: each prompt's text embedding normalised, averaged
        over the templates per class, normalised again (Radford et al. 2021's ensembling)."""
        device = self._device()
        return class_text_embeddings(self.clip.encode_text, lambda prompts: self.tokenizer(prompts).to(device),
                                     self.class_names, self.templates, self.prompt_batch_size)

    def class_embeddings(self) -> Tensor:
        """``[C, D]`` float32 L2-normalised class embeddings of the current weights: cached (no
        graph) unless the text tower needs gradients now; see the caching scheme above."""
        if self._text_needs_grad():
            return self.encode_classes()
        key = self._weights_key()
        if key is None or self._cache is None or self._cache[0] != key:
            device = self._device()
            was_training = self.clip.training
            # a fixed context: eval mode, fp32 (no ambient autocast), a normal tensor even when
            # the first call comes from inside torch.inference_mode (Lightning's test loop)
            with torch.inference_mode(False), torch.no_grad(), \
                    torch.autocast(device.type, enabled=False):
                self.clip.train(False)
                try:
                    text = self.encode_classes()
                finally:
                    self.clip.train(was_training)
            self._cache = (key, text)
        return self._cache[1]

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> Tensor:
        """``images``: ``[B, 3, H, W]`` already resized and normalised for this CLIP; returns
        logits ``[B, C]``."""
        weight = next(self.clip.visual.parameters(), None) if hasattr(self.clip, "visual") else None
        if weight is not None and images.is_floating_point() and images.dtype != weight.dtype:
            images = images.to(weight.dtype)  # fp16 / bf16 open_clip precisions
        image = F.normalize(self.clip.encode_image(images).float(), dim=-1)
        text = self.class_embeddings().to(image.device)
        scale = self.clip.logit_scale.exp().float()
        bias = getattr(self.clip, "logit_bias", None)
        return self.head(image, text, scale, None if bias is None else bias.float())

    def extra_repr(self) -> str:
        return (f"classes={self.num_classes}, templates={len(self.templates)}, "
                f"image_size={self.image_size}")


# ---- state-dict hooks: keys of the bare CLIP model ----------------------------------------------
def _bare_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post hook: ``<prefix>clip.<key>`` -> ``<prefix><key>`` (order kept)."""
    inner = prefix + PREFIX
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        metadata.pop(inner[:-1], None)  # the CLIP module's own entry: the wrapper's stands for it
        for key in [k for k in metadata if k.startswith(inner)]:
            metadata[prefix + key[len(inner):]] = metadata.pop(key)


def _accept_bare_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata, strict,
                      missing_keys, unexpected_keys, error_msgs) -> None:
    """load_state_dict pre hook: ``<prefix><key>`` -> ``<prefix>clip.<key>`` for keys without the
    prefix (a bare open_clip state_dict); keys that already have it are left alone."""
    inner = prefix + PREFIX
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        target = inner + key[len(prefix):]
        if target not in state_dict:
            state_dict[target] = state_dict.pop(key)


def _invalidate_after_load(module: nn.Module, incompatible_keys) -> None:
    module.invalidate()


def _register_load_pre_hook(module: nn.Module, hook: Callable) -> None:
    public = getattr(module, "register_load_state_dict_pre_hook", None)  # torch >= 2.5
    if public is not None:
        public(hook)
    else:
        module._register_load_state_dict_pre_hook(hook, with_module=True)


# ---- validation -----------------------------------------------------------------------------
def _names(class_names) -> tuple[str, ...]:
    if isinstance(class_names, str) or not class_names:
        raise KdkitError(f"zero-shot classifier: class_names must be a non-empty list of class "
                         f"names in label order, got {class_names!r}")
    names = tuple(str(n) for n in class_names)
    if any(not n.strip() for n in names):
        raise KdkitError(f"zero-shot classifier: empty class name in {list(names)}")
    return names


def _templates(templates) -> tuple[str, ...]:
    if isinstance(templates, str):
        templates = [templates]
    templates = tuple(str(t) for t in (templates or ()))
    if not templates or any(t.count("{}") != 1 for t in templates):
        raise KdkitError(f"zero-shot classifier: templates must be prompts with exactly one '{{}}' "
                         f"each (the class name), got {list(templates)}")
    return templates


# ---- factory ----------------------------------------------------------------------------------
def zero_shot_classifier(
    clip: Mapping | nn.Module,
    class_names: Sequence[str],
    templates: Sequence[str] | None = None,
    tokenizer: str | Callable[[list[str]], Tensor] | None = None,
    prompt_batch_size: int = 1024,
) -> ZeroShotClassifier:
    """A ``ZeroShotClassifier`` (CLIP zero-shot classification, Radford et al. 2021) for Hydra's
    ``_target_``: the classifier's images go through this CLIP's image tower; its logits are the
    scaled similarities with class-name prompt ensembles.

    Args:
        clip: the keyword arguments of ``kdkit.models.clip.clip_model`` (``name``, ``pretrained``,
            ``precision``, ``image_size``...), or an open_clip model.
        class_names: class names in label order (their count is the logits' C).
        templates: prompt templates with one ``{}``; None: CLIP's 18 CIFAR-10 templates
            (``kdkit.datamodules.cifar10_pairs.CIFAR_TEMPLATES``), the captions kdkit's CIFAR-10
            CLIP runs train on (``data=cifar10_pairs`` with ``templates: null``).
        tokenizer: a callable, or an open_clip model name whose tokenizer to use; None: the
            tokenizer of ``clip["name"]`` (required when ``clip`` is a model). Either way at the
            model's context length.
        prompt_batch_size: prompts encoded at once.
    """
    from kdkit.models.clip import clip_model, clip_tokenizer

    name = None
    if isinstance(clip, nn.Module):
        model = clip
    elif isinstance(clip, Mapping):
        kwargs = _plain(clip)
        name = kwargs.get("name")
        if not name:
            raise KdkitError("zero_shot_classifier: clip needs a model name (clip.name)")
        model = clip_model(**kwargs)
    else:
        raise KdkitError(f"zero_shot_classifier: clip must be clip_model's arguments or an "
                         f"open_clip model, got {type(clip).__name__}")
    if tokenizer is None or isinstance(tokenizer, str):
        name = tokenizer or name
        if name is None:
            raise KdkitError("zero_shot_classifier: give the tokenizer (a callable or the open_clip "
                             "model name) when clip is a model")
        tokenizer = clip_tokenizer(name, context_length=getattr(model, "context_length", None))
    if templates is None:
        from kdkit.datamodules.cifar10_pairs import CIFAR_TEMPLATES

        templates = CIFAR_TEMPLATES
    return ZeroShotClassifier(model, class_names=list(class_names), templates=list(templates),
                              tokenizer=tokenizer, prompt_batch_size=prompt_batch_size)


def _plain(node: Mapping) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(node, DictConfig):
            return dict(OmegaConf.to_container(node, resolve=True))
    except ImportError:  # pragma: no cover - omegaconf comes with hydra
        pass
    return dict(node)
