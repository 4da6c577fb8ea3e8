"""CLIP students as an open_clip ``local-dir:`` folder, loadable without kdkit's model configs.

``open_clip_config.json`` carries the whole model config (``model_cfg``: kdkit's tiny
architectures are not among open_clip's built-in names) and the preprocessing kdkit used
(``preprocess_cfg``: input size, mean, std, bilinear resizing as kdkit's own pipeline);
``open_clip_model.safetensors`` holds the weights under the name open_clip looks for first.
open_clip reads the folder with ``create_model_and_transforms("local-dir:<folder>")`` and
``get_tokenizer("local-dir:<folder>")`` (checked with open_clip_torch 3.3.0, ``factory.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from kdkit.errors import KdkitError
from kdkit.exports.optional import write_json

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"  # first in open_clip's preferred checkpoint names


def model_config(model: nn.Module) -> dict:
    """The open_clip model config ``model`` was built from (recorded by
    ``kdkit.models.clip.clip_model`` as ``open_clip_model_cfg``)."""
    cfg = getattr(model, "open_clip_model_cfg", None)
    if not isinstance(cfg, dict):
        raise KdkitError(f"the {type(model).__name__} student carries no open_clip model config "
                         "(students built by kdkit.models.clip.clip_model do)")
    return copy.deepcopy(cfg)


def save_open_clip_dir(model: nn.Module, directory, size: Sequence[int], mean: Sequence[float],
                       std: Sequence[float], tokenizer=None) -> list[Path]:
    """Write ``model`` as an open_clip ``local-dir:`` folder into ``directory``.

    Args:
        model: an open_clip model built by ``kdkit.models.clip.clip_model``.
        size: ``(H, W)`` of the images kdkit fed the student.
        mean, std: the per-channel normalisation kdkit applied.
        tokenizer: the model's tokenizer; saved into the folder only when the config names a
            Hugging Face tokenizer (open_clip's ``local-dir:`` reads it from there), the
            built-in CLIP tokenizer needs no file.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model_config(model)
    preprocess = {"size": [int(s) for s in size], "mean": [float(v) for v in mean], "std": [float(v) for v in std],
                  "interpolation": "bilinear", "resize_mode": "shortest"}
    paths = [write_json(directory / CONFIG_NAME, {"model_cfg": cfg, "preprocess_cfg": preprocess})]
    if cfg.get("text_cfg", {}).get("hf_tokenizer_name"):
        hf = getattr(tokenizer, "tokenizer", None)
        if hf is None or not hasattr(hf, "save_pretrained"):
            raise KdkitError("the model config names a Hugging Face tokenizer but the task has none to save")
        hf.save_pretrained(str(directory))
    # safetensors refuses tensors that share storage: store each once, as float32 on the CPU
    state = {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
             for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME))
    return paths + [directory / WEIGHTS_NAME]
