"""timm students as timm's own hub folder: ``config.json`` + ``model.safetensors``.

Written by ``timm.models.save_for_hf`` (exactly what timm writes for the Hugging Face hub), with
the preprocessing kdkit used (input size, mean, std) as the folder's ``pretrained_cfg``. timm
1.0.31 (checked against its source: ``timm.models._factory`` accepts the ``local-dir:`` schema)
loads it by itself::

    model = timm.create_model("local-dir:<folder>", pretrained=True)  # architecture + weights
    cfg = timm.data.resolve_data_config(model=model)                 # input_size, mean, std

``pretrained=True`` is what makes timm read the weights; the saved model arguments (classes,
input channels) rebuild the architecture. A timm without that schema still reads the files:
``timm.create_model(<architecture in config.json>, pretrained=True, num_classes=...,
pretrained_cfg_overlay={"file": "<folder>/model.safetensors"})``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn

from kdkit.errors import KdkitError


def is_timm_model(model: nn.Module) -> bool:
    """Whether ``model`` is a timm model (built by ``timm.create_model``: it carries timm's
    ``pretrained_cfg`` and is defined in a ``timm`` module)."""
    return hasattr(model, "pretrained_cfg") and type(model).__module__.split(".")[0] == "timm"


def save_timm_dir(model: nn.Module, directory, input_size: Sequence[int], mean: Sequence[float],
                  std: Sequence[float], class_names: Sequence[str] | None = None) -> list[Path]:
    """Write ``model`` as a timm hub folder into ``directory``.

    Args:
        model: a timm model (see ``is_timm_model``); its weights are copied to CPU float32.
        input_size: ``(C, H, W)`` of the images kdkit fed it.
        mean, std: the per-channel normalisation kdkit applied (timm's transforms apply it too).
        class_names: the label order, saved as ``label_names`` when known.
    """
    import timm.models

    if not is_timm_model(model):
        raise KdkitError(f"{type(model).__name__} is not a timm model")
    from kdkit.exports.program import inference_copy

    directory = Path(directory)
    data_config = {"input_size": tuple(int(v) for v in input_size), "mean": tuple(float(v) for v in mean),
                   "std": tuple(float(v) for v in std), "crop_pct": 1.0, "interpolation": "bilinear"}
    model_config = {"label_names": list(class_names)} if class_names else None
    timm.models.save_for_hf(inference_copy(model), str(directory), model_config=model_config,
                            safe_serialization=True, data_config=data_config)
    return [directory / "config.json", directory / "model.safetensors"]
