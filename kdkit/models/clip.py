"""CLIP models and tokenizers through open_clip: by name, with a pretrained tag or a local file.

kdkit ships a few tiny CLIP architectures as open_clip model configs (``conf/clip_models/*.json``)
for tests and CPU benchmarks; ``register_configs`` adds them to open_clip's registry with
``open_clip.add_model_config``, so they are created exactly like ``ViT-B-32``.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from kdkit.errors import KdkitError, close_names

_registered = False


def config_dir() -> Path:
    """The folder of kdkit's open_clip model configs (inside the ``conf`` package)."""
    try:
        from importlib.resources import files

        path = Path(str(files("kdkit.conf") / "clip_models"))
    except ModuleNotFoundError:  # running from a checkout without ``conf`` on the path
        path = Path(__file__).resolve().parents[2] / "conf" / "clip_models"
    return path


def register_configs() -> list[str]:
    """Register kdkit's tiny CLIP configs with open_clip (once); return their names."""
    global _registered
    import open_clip

    folder = config_dir()
    if not _registered:
        open_clip.add_model_config(folder)
        _registered = True
    return sorted(p.stem for p in folder.glob("*.json"))


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.startswith((".", "~")) or Path(value).suffix in {
        ".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz"}


def clip_model(
    name: str,
    pretrained: str | None = None,
    precision: str = "fp32",
    image_size: int | None = None,
    context_length: int | None = None,
    **model_kwargs,
) -> nn.Module:
    """An open_clip CLIP model (``CLIP`` / ``CustomTextCLIP``), randomly initialised or loaded.

    Args:
        name: open_clip model name (``ViT-B-32``, ``RN50``, ...) or a kdkit tiny config
            (``kdkit-vit-p8-d128``...: see ``conf/clip_models``).
        pretrained: a pretrained tag of ``name`` (``openai``, ``laion2b_s34b_b79k``...; downloads,
            so online only) or a local checkpoint file (an open_clip/OpenAI checkpoint or a
            ``state_dict`` saved with ``torch.save``, e.g. kdkit's exported ``student.pt``).
            None: random initialisation.
        precision: open_clip precision ("fp32", "bf16", "fp16", "pure_bf16"...).
        image_size: override the config's input resolution (positional embeddings are resized
            when loading weights).
        context_length: override the text context length.
        **model_kwargs: overrides of the model config, passed to open_clip.create_model.
    """
    import open_clip

    register_configs()
    if name not in open_clip.list_models():
        raise KdkitError(f"unknown open_clip model {name!r}; close names: "
                         f"{close_names(name, open_clip.list_models())}")
    if pretrained:
        pretrained = str(pretrained)
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            path = Path(pretrained).expanduser()
            if not path.is_file():
                kind = "checkpoint file" if _looks_like_path(pretrained) else "pretrained tag or file"
                raise KdkitError(
                    f"{kind} {pretrained!r} for {name} not found; pretrained tags of {name}: "
                    f"{', '.join(tags) or 'none'} (tags need internet), or train one with kdkit-train"
                )
            pretrained = str(path)
    try:
        model = open_clip.create_model(
            name, pretrained=pretrained, precision=precision, force_image_size=image_size,
            force_context_length=context_length, **model_kwargs)
    except (RuntimeError, AssertionError, ValueError, KeyError) as err:
        # download failures; state_dict mismatches (open_clip asserts on some of them)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise KdkitError(f"could not load {name} weights {pretrained!r}: {first}") from None
    # open_clip keeps no config on the model; the export (kdkit.exports.open_clip_dir) writes this
    # one, so the model loads where kdkit's own config names are unknown
    model.open_clip_model_cfg = _final_config(name, image_size, context_length, model_kwargs)
    return model


def _final_config(name: str, image_size, context_length, model_kwargs: dict) -> dict:
    """The config open_clip built ``name`` from, with the same overrides as ``create_model``."""
    import open_clip

    cfg = open_clip.get_model_config(name)  # a copy
    if image_size is not None:
        cfg["vision_cfg"]["image_size"] = image_size
    if context_length is not None:
        cfg["text_cfg"]["context_length"] = context_length
    cfg.update(model_kwargs)
    return cfg


def clip_tokenizer(name: str, context_length: int | None = None):
    """The tokenizer open_clip pairs with model ``name`` (a callable: list of str -> [N, L] ids).

    Args:
        name: open_clip model name (its config picks the tokenizer and default context length).
        context_length: number of tokens per text (default: the model's).
    """
    import open_clip

    register_configs()
    if name not in open_clip.list_models():
        raise KdkitError(f"unknown open_clip model {name!r}; close names: "
                         f"{close_names(name, open_clip.list_models())}")
    return open_clip.get_tokenizer(name, context_length=context_length)


def preprocess_stats(model: nn.Module) -> dict:
    """``{"mean", "std", "size", "context_length"}`` an open_clip model expects on its inputs."""
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", getattr(getattr(model, "visual", None), "image_size", None))
    if isinstance(size, (tuple, list)):
        size = tuple(int(s) for s in size)
    elif size is not None:
        size = (int(size), int(size))
    return {
        "mean": tuple(float(v) for v in cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        "std": tuple(float(v) for v in cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        "size": size,
        "context_length": getattr(model, "context_length", None),
    }


def class_text_embeddings(encode_text, tokenize, class_names, templates, batch_size: int = 1024):
    """``[C, D]`` float32 zero-shot class embeddings (Radford et al. 2021's prompt ensembling):
    every ``template.format(name)`` encoded (``tokenize(prompts) -> tokens``, then
    ``encode_text(tokens, normalize=True)``), averaged over the templates per class, normalised
    again. Prompts go through in chunks of ``batch_size``."""
    import torch
    import torch.nn.functional as F

    names, templates = list(class_names), list(templates)
    prompts = [t.format(name) for name in names for t in templates]
    parts = [encode_text(tokenize(prompts[i:i + batch_size]), normalize=True).float()
             for i in range(0, len(prompts), batch_size)]
    text = torch.cat(parts).view(len(names), len(templates), -1)
    return F.normalize(text.mean(1), dim=-1)

