"""Names of per-layer text embeddings: ``features["<field>@<k>"]``.

A retrieval distiller that reads a text field's embedding after block ``k`` (0-based) of a model
declares ``"<field>@<k>"`` among its ``student_features`` / ``teacher_features`` (e.g.
``"query@1"``, ``"passage@0"``), or ``"<field>@*"`` for every block of that model (its depth is
not known to the distiller when it declares what it reads). The retrieval task computes them
(``kdkit.tasks.retrieval_layers``); these helpers only name, parse and collect them, so that
distillers need nothing from the task.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

from kdkit.errors import KdkitError
from kdkit.outputs import Outputs

FIELDS = ("text", "query", "passage")  # the text fields of a retrieval batch
SEP = "@"
EVERY = "*"


def layer_feature(field: str, layer: int | str) -> str:
    """The feature name of ``field``'s embedding after block ``layer`` (``"*"``: every block)."""
    return f"{field}{SEP}{layer}"


def parse(name: str) -> tuple[str, int | None] | None:
    """``(field, layer)`` of a per-layer feature name (layer None for ``"*"``), or None when
    ``name`` is not one (a module name to tap)."""
    field, sep, layer = name.rpartition(SEP)
    if not sep or field not in FIELDS:
        return None
    if layer == EVERY:
        return field, None
    if not layer.lstrip("-").isdigit():
        raise KdkitError(f"feature {name!r}: write <field>@<block index> or <field>@*, e.g. query@1")
    return field, int(layer)


def split(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """``names`` split into (module names to tap, per-layer feature names)."""
    taps, layers = [], []
    for name in names:
        (layers if parse(name) is not None else taps).append(name)
    return taps, layers


def by_layer(outputs: Outputs, field: str) -> dict[int, Tensor]:
    """Every ``features["<field>@<k>"]`` of ``outputs``, by block ``k``."""
    found = {}
    for name, value in outputs.features.items():
        parsed = parse(name) if SEP in name else None
        if parsed is not None and parsed[0] == field and parsed[1] is not None:
            found[parsed[1]] = value
    return dict(sorted(found.items()))
