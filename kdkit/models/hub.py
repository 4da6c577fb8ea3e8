"""Thin factories over timm and torchvision, with local checkpoints as a first-class path.

Hub weights are fetched by the libraries themselves when online (``pretrained=True`` for timm,
``weights="DEFAULT"`` or an enum name for torchvision); offline, point ``checkpoint_path`` at a
local file. Any other ``nn.Module`` needs no factory: give its class path as ``_target_`` in a
teacher/student config (the class must be importable, e.g. on ``PYTHONPATH``).
"""

from __future__ import annotations

import os

from torch import nn

from kdkit.checkpoints import existing_file, load_weights
from kdkit.errors import KdkitError, close_names
from kdkit.features import last_linear


def _offline_error(library: str, name: str, err: Exception) -> KdkitError:
    return KdkitError(
        f"could not fetch pretrained {library} weights for {name!r} ({type(err).__name__}); "
        "offline machines need a local file: set checkpoint_path"
    )


def timm_model(name: str, num_classes: int, pretrained: bool = False,
               checkpoint_path: str | os.PathLike | None = None, **kwargs) -> nn.Module:
    """``timm.create_model(name, ...)`` with kdkit's error messages.

    Args:
        name: timm model name, optionally with a pretrained tag (``"resnet18.a1_in1k"``).
        num_classes: classifier size (timm drops a mismatching pretrained head itself).
        pretrained: download the hub weights (needs network access).
        checkpoint_path: local weights loaded by timm's own loader (state_dict, ``{"state_dict":
            ...}`` or safetensors); they must match ``num_classes``.
        **kwargs: passed to ``timm.create_model`` (``drop_rate``, ``in_chans``, ...).
    """
    import timm

    if not timm.is_model(name):
        raise KdkitError(f"unknown timm model {name!r}; close names: "
                         f"{close_names(name, timm.list_models())}")
    path = str(existing_file(checkpoint_path, "checkpoint_path")) if checkpoint_path else None
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes,
                                 checkpoint_path=path, **kwargs)
    except OSError as err:
        if pretrained:
            raise _offline_error("timm", name, err) from err
        raise


def torchvision_model(name: str, num_classes: int, weights: str | None = None,
                      checkpoint_path: str | os.PathLike | None = None, **kwargs) -> nn.Module:
    """``torchvision.models.get_model(name, ...)`` with an optional local checkpoint.

    Hub weights come with their own classifier (1000 ImageNet classes); when ``num_classes``
    differs, that last linear layer is replaced by a freshly initialised one of the right size.

    Args:
        name: torchvision model name (``"resnet18"``, ``"mobilenet_v3_small"``, ...).
        num_classes: classifier size.
        weights: hub weights (``"DEFAULT"``, ``"IMAGENET1K_V1"`` or ``"ResNet18_Weights.DEFAULT"``);
            downloaded by torchvision, so online only.
        checkpoint_path: local weights loaded with ``kdkit.checkpoints.load_weights``.
        **kwargs: passed to the torchvision builder.
    """
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        raise KdkitError(f"unknown torchvision model {name!r}; close names: {close_names(name, names)}")
    if weights is None:
        model = torchvision.models.get_model(name, num_classes=num_classes, **kwargs)
    else:
        enum = torchvision.models.get_model_weights(name)
        try:
            resolved = enum[weights.split(".")[-1]]
        except KeyError:
            raise KdkitError(f"unknown weights {weights!r} for {name}; valid: "
                             f"DEFAULT, {', '.join(w.name for w in enum)}") from None
        try:
            model = torchvision.models.get_model(name, weights=resolved, **kwargs)
        except OSError as err:  # urllib errors are OSErrors
            raise _offline_error("torchvision", name, err) from err
        if len(resolved.meta["categories"]) != num_classes:
            _replace_classifier(model, num_classes)
    if checkpoint_path:
        load_weights(model, checkpoint_path, what="checkpoint_path")
    return model


def _replace_classifier(model: nn.Module, num_classes: int) -> None:
    name = last_linear(model)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
