"""Retrieval students as a sentence-transformers folder, written through its own API.

The folder is ``SentenceTransformer(modules=[Transformer, Pooling, (Dense), (Normalize)])``
saved with ``SentenceTransformer.save``: the same stack ``kdkit.models.text.TextEncoder``
computes (its pooling, its linear projection, its L2 normalisation, its max length), so
``SentenceTransformer(folder).encode`` gives kdkit's embeddings. The transformer weights and
tokenizer sit at the top of the folder, so ``transformers.AutoModel`` loads the backbone too.

kdkit removes BERT's pooler (``kdkit.models.text_source.drop_pooler``: a dense layer on [CLS] that
sentence embeddings never read). Its class, rebuilt from ``config.json``, would create that
layer again and report ``pooler.dense.* | MISSING``, so the folder asks transformers for the
model without it (``model_kwargs: {add_pooling_layer: false}`` in ``sentence_bert_config.json``).
"""

from __future__ import annotations

import inspect
import json
import tempfile
from pathlib import Path

from torch import nn


def no_pooler_kwargs(backbone: nn.Module) -> dict:
    """``{"add_pooling_layer": False}`` when ``backbone``'s class builds a pooler by default
    that this backbone no longer has (BERT-like models after ``drop_pooler``), else ``{}``."""
    params = inspect.signature(type(backbone).__init__).parameters
    if "add_pooling_layer" in params and getattr(backbone, "pooler", True) is None:
        return {"add_pooling_layer": False}
    return {}


def _modules():
    """The module classes: ``sentence_transformer.modules`` (v6+) or ``models`` (v3-v5)."""
    try:
        from sentence_transformers.sentence_transformer import modules
    except ImportError:
        from sentence_transformers import models as modules
    return modules


def save_sentence_transformer(encoder, directory) -> Path:
    """Write ``encoder`` (a ``kdkit.models.text.TextEncoder``) as a sentence-transformers folder
    into ``directory``; returns the folder."""
    from sentence_transformers import SentenceTransformer

    modules = _modules()
    directory = Path(directory)
    extra = no_pooler_kwargs(encoder.backbone)
    with tempfile.TemporaryDirectory(prefix=".kdkit-backbone-") as source:
        # Transformer loads from a folder: saving and reading back is also the proof it loads
        encoder.backbone.save_pretrained(source)
        encoder.tokenizer.save_pretrained(source)
        takes = inspect.signature(modules.Transformer.__init__).parameters
        key = "model_kwargs" if "model_kwargs" in takes else "model_args"  # v6 / v3-v5 name
        stack = [modules.Transformer(source, max_seq_length=encoder.max_length, **{key: dict(extra)})]
        hidden = encoder.backbone.config.hidden_size
        stack.append(modules.Pooling(hidden, pooling_mode=encoder.pooling))
        if encoder.projection is not None:
            linear = encoder.projection
            bias = None if linear.bias is None else linear.bias.detach().float().cpu().clone()
            stack.append(modules.Dense(linear.in_features, linear.out_features, bias=bias is not None,
                                       activation_function=nn.Identity(),
                                       init_weight=linear.weight.detach().float().cpu().clone(), init_bias=bias))
        if encoder.normalize:
            stack.append(modules.Normalize())
        # saved while the source folder exists: transformers may map its weights lazily
        SentenceTransformer(modules=stack, device="cpu").save(str(directory))
    _complete_config(directory / "sentence_bert_config.json", encoder.max_length, key, extra)
    return directory


def _complete_config(path: Path, max_length: int, key: str, model_kwargs: dict) -> None:
    """Add what every sentence-transformers version reads back: ``max_seq_length`` (v6 keeps it
    in the tokenizer config only; kdkit's ``sentence_config`` and v3-v5 read it here) and the
    pooler-free ``model_kwargs``."""
    config = json.loads(path.read_text()) if path.is_file() else {}
    config["max_seq_length"] = int(max_length)
    config.setdefault("do_lower_case", False)
    if model_kwargs:
        config.setdefault(key, {}).update(model_kwargs)
    path.write_text(json.dumps(config, indent=4))
