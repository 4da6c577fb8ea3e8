"""Per-layer embeddings for retrieval distillers: ``features["<field>@<k>"]``.

A distiller that reads a text field's embedding after block ``k`` (0-based) of a model declares
``"<field>@<k>"`` among its ``student_features`` / ``teacher_features`` (e.g. ``"query@1"``,
``"passage@0"``), or ``"<field>@*"`` for every block of that model (its depth is not known to
the distiller when it declares what it reads). The retrieval task then runs that model with
``TextEncoder.forward_exits`` instead of its plain forward, and the outputs carry one embedding
per requested block beside the usual ones (passages ``[B, G, D]`` like ``features["passage"]``).
Nobody asking means the plain forward: no cost. The names: ``kdkit.distillers.layer_names``.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

from kdkit.distillers.layer_names import FIELDS, SEP, by_layer, layer_feature, parse, split  # noqa: F401
from kdkit.errors import KdkitError
from kdkit.outputs import Outputs
from kdkit.tasks.retrieval_table import embedding_outputs


def requests(names: Iterable[str], num_layers: int, who: str = "model") -> dict[str, list[int]]:
    """Per text field, the sorted blocks whose embeddings ``names`` ask for (``*`` expanded to
    ``0..num_layers - 1``); a block the model does not have is a clear error."""
    out: dict[str, set[int]] = {}
    for name in names:
        parsed = parse(name)
        if parsed is None:
            continue
        field, layer = parsed
        if layer is not None and not 0 <= layer < num_layers:
            raise KdkitError(f"feature {name!r}: the {who} has blocks 0..{num_layers - 1}")
        out.setdefault(field, set()).update(range(num_layers) if layer is None else [layer])
    return {field: sorted(layers) for field, layers in out.items()}


def layer_outputs(model: nn.Module, batch: dict, wanted: dict[str, list[int]]) -> Outputs:
    """The retrieval outputs of ``model`` (a ``TextEncoder``) on ``batch`` with, for each field in
    ``wanted``, ``features["<field>@*"]`` expanded: ``features["<field>@<k>"]`` per block."""
    feats: dict[str, Tensor] = {}
    extra: dict[str, Tensor] = {}
    for field in FIELDS:
        if f"{field}_input_ids" not in batch:
            continue
        ids, mask = batch[f"{field}_input_ids"], batch[f"{field}_attention_mask"]
        if field in wanted:
            feats[field], per_layer = model.forward_exits(ids, mask, wanted[field])
            extra.update({layer_feature(field, k): emb for k, emb in per_layer.items()})
        else:
            feats[field] = model(ids, mask)
    out = embedding_outputs(feats)
    if "passage" in feats and "query" in feats:  # passages in groups, as embedding_outputs does
        b = feats["query"].shape[0]
        extra = {k: v.reshape(b, -1, v.shape[-1]) if k.startswith("passage" + SEP) else v for k, v in extra.items()}
    out.features.update(extra)
    return out
