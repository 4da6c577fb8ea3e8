"""Write one optional export format without ever failing the run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kdkit.errors import KdkitError, say


def optional_format(name: str, write: Callable[[], list[Path]]) -> list[Path]:
    """The paths ``write()`` produced, or ``[]`` and one warning line naming format ``name``
    and the reason when it raised: an optional format (a program torch.export cannot trace, a
    library too old for a schema) must not cost the user the run's other exports."""
    try:
        return list(write())
    except Exception as err:  # noqa: BLE001 - whatever went wrong, the other formats go on
        first = (str(err).strip().splitlines() or [""])[0][:300]
        reason = first if isinstance(err, KdkitError) else f"{type(err).__name__}: {first}"
        say(f"export: {name} not written ({reason})", warning=True)
        return []


def task_datamodule(task, datamodule=None):
    """The datamodule an export reads (example inputs, preprocessing facts): the one given,
    else the one of the Trainer that ran ``task``; None when there is neither."""
    if datamodule is not None:
        return datamodule
    trainer = getattr(task, "_trainer", None)
    return getattr(trainer, "datamodule", None) if trainer is not None else None


def write_json(path: Path, obj) -> Path:
    """``obj`` as indented JSON at ``path`` (parents created)."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path
