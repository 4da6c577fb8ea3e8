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
from kdkit.models.text_layers import freeze_word_embeddings, keep_layers, set_dropout
from kdkit.models.text_source import (POOLING, ST_POOLING_KEYS, check_source, default_max_length, drop_pooler,
                                      hub_error, load_backbone, load_tokenizer, read_dense, resolve_name_or_path,
                                      sentence_config)


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
            from kdkit.exports.sentence_transformers_dir import (
                save_sentence_transformer,
            )

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
                     **{key: mode == self.pooling for mode, key in ST_POOLING_KEYS.items()},
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
    backbone = load_backbone(name_or_path)
    encoder = TextEncoder(
        backbone, tokenizer,
        pooling=pooling or st.get("pooling", "mean"),
        normalize=st.get("normalize", False) if normalize is None else normalize,
        max_length=max_length or st.get("max_length") or default_max_length(tokenizer, backbone),
        projection_dim=None if "dense" in st else projection_dim,
    )
    if "dense" in st:
        encoder.projection = read_dense(name_or_path, st["dense"])
    return encoder


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
        check_source(source)
        st = sentence_config(source)
        try:
            hf_config = AutoConfig.from_pretrained(source, **overrides)
        except (OSError, ValueError) as exc:
            raise hub_error(source, exc) from exc
        tokenizer_source = resolve_name_or_path(tokenizer) if tokenizer else source
    if pretrained:
        backbone = load_backbone(source, hf_config)
    else:
        backbone = drop_pooler(AutoModel.from_config(hf_config))
    tok = load_tokenizer(tokenizer_source)
    vocab = getattr(backbone.config, "vocab_size", None)
    if vocab is not None and len(tok) > vocab:
        raise KdkitError(f"tokenizer has {len(tok)} tokens but the model's vocab_size is {vocab}: "
                         "use the model's own tokenizer or set config.vocab_size")
    encoder = TextEncoder(backbone, tok, pooling=pooling or st.get("pooling", "mean"),
                          normalize=st.get("normalize", True) if normalize is None else normalize,
                          max_length=max_length or st.get("max_length") or default_max_length(tok, backbone),
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
