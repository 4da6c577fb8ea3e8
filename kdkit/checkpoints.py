"""Loading model weights from the files people actually have.

Accepted: a bare ``state_dict`` saved with ``torch.save`` (what ``kdkit`` exports as
``student.pt``), a Lightning checkpoint ``{"state_dict": {"student.<name>": ...}}`` written by a
kdkit stage (the ``student.`` prefix is stripped and adapters are dropped), a ``{"model": ...}``
dict, ``.safetensors`` files, and (only with ``trust=True``) a pickled ``nn.Module``. A ``module.`` prefix left by
``DistributedDataParallel`` is stripped too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from kdkit.checkpoint_io import safe_load
from kdkit.errors import KdkitError, unreadable

STUDENT_PREFIX = "student."


def existing_file(path: str | os.PathLike, what: str = "teacher checkpoint") -> Path:
    """``path`` as a Path, or a KdkitError naming ``what`` was not found."""
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise KdkitError(f"{what} not found: {resolved}")
    return resolved


def _strip(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def read_state_dict(path: str | os.PathLike, what: str = "teacher checkpoint",
                    trust: bool = False) -> dict[str, Tensor]:
    """The model ``state_dict`` stored in ``path`` (see the module docstring for formats).

    Pickled files load with ``weights_only=True``: one that needs arbitrary unpickling (a
    pickled ``nn.Module``, or a checkpoint with pickled objects) is refused unless ``trust``.
    """
    path = existing_file(path, what)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise unreadable(path, what, err, "the file is truncated or corrupt; replace it") from None
    else:
        obj = safe_load(path, what, trust=trust)
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise KdkitError(f"{what} {path} holds no state_dict (got {type(obj).__name__})")
    state = dict(obj)
    if any(k.startswith(STUDENT_PREFIX) for k in state):
        state = _strip(state, STUDENT_PREFIX)  # a kdkit Lightning checkpoint: keep the model
    if state and all(k.startswith("module.") for k in state):
        state = _strip(state, "module.")
    return state


def load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True,
                 what: str = "teacher checkpoint", trust: bool = False,
                 layout: str | None = None) -> nn.Module:
    """Load the weights in ``path`` into ``model`` (in place) and return ``model``.

    Args:
        model: the network to fill.
        path: checkpoint file (state_dict, Lightning checkpoint or safetensors).
        strict: require the keys to match exactly (shapes must always match).
        what: how error messages name the file.
        trust: allow arbitrary unpickling (``teacher.trust_checkpoint``; off by default).
        layout: the key layout of a checkpoint from another toolkit (``teacher.ckpt_layout``:
            torchdistill, repdistiller, mdistiller; see ``kdkit.peer_checkpoints``); None: kdkit's.
    """
    state = read_state_dict(path, what, trust)
    if layout:
        from kdkit.peer_checkpoints import to_kdkit

        state = to_kdkit(state, layout, f"{what} {path}")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # size mismatches are raised even when strict=False
        first = str(err).strip().splitlines()[1:2] or [str(err)]
        raise KdkitError(f"{what} {path} does not fit {type(model).__name__}: {first[0].strip()}") from None
    if strict and (missing or unexpected):
        raise KdkitError(
            f"{what} {path} does not fit {type(model).__name__}: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}"
        )
    return model
