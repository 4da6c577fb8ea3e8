"""Per-layer embeddings of TextEncoder (forward_exits), cutting at an exit, and the retrieval
outputs ``features["<field>@<k>"]`` built from them."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel

from kdkit.errors import KdkitError
from kdkit.models.text import hf_encoder
from kdkit.models.text_layers import cut_at_exit
from kdkit.tasks.retrieval_layers import by_layer, layer_outputs, parse, requests, split

CONFIG = dict(model_type="bert", vocab_size=30522, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
              intermediate_size=32, max_position_embeddings=32)
TEXTS = ["stem cells heal hearts", "vitamin d", "a much longer text about gene therapy trials"]


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return hf_encoder(config=CONFIG, pretrained=False, max_length=16).eval()


def by_hand(encoder, k: int, ids, mask):
    """A fresh BERT of k + 1 blocks holding the encoder's embeddings and blocks 0..k, then mean
    pooling over real tokens and L2 normalisation written out."""
    config = AutoConfig.for_model(**{**CONFIG, "num_hidden_layers": k + 1})
    model = AutoModel.from_config(config, add_pooling_layer=False).eval()
    state = {n: v for n, v in encoder.backbone.state_dict().items()
             if not n.startswith("encoder.layer.") or int(n.split(".")[2]) <= k}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if not m.startswith("pooler")]
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    return F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


def test_each_exit_equals_a_forward_through_the_first_blocks(encoder):
    enc = encoder.tokenize(TEXTS)
    with torch.no_grad():
        final, per_exit = encoder.forward_exits(enc["input_ids"], enc["attention_mask"], [0, 1, 2])
        assert sorted(per_exit) == [0, 1, 2]
        for k in range(3):
            torch.testing.assert_close(per_exit[k], by_hand(encoder, k, enc["input_ids"], enc["attention_mask"]),
                                       atol=1e-5, rtol=0)
            cut = cut_at_exit(encoder, k)
            assert cut.num_layers == k + 1 and encoder.num_layers == 3  # a copy: the encoder keeps its blocks
            torch.testing.assert_close(cut(**enc), per_exit[k], atol=1e-6, rtol=0)
        torch.testing.assert_close(final, encoder(**enc))
        torch.testing.assert_close(per_exit[2], final)
        assert not torch.allclose(per_exit[0], final, atol=1e-3)  # the exits do differ
    with pytest.raises(KdkitError, match="blocks 0..2"):
        encoder.forward_exits(enc["input_ids"], enc["attention_mask"], [3])
    with pytest.raises(KdkitError, match="blocks 0..2"):
        cut_at_exit(encoder, -1)


def test_feature_names_parse_and_expand():
    assert parse("query@1") == ("query", 1) and parse("passage@*") == ("passage", None)
    assert parse("backbone.encoder.layer.0") is None and parse("fc:input") is None
    assert split(["query@0", "layer1", "text@*"]) == (["layer1"], ["query@0", "text@*"])
    assert requests(["query@2", "query@0", "passage@*", "layer1"], 3) == {"query": [0, 2], "passage": [0, 1, 2]}
    with pytest.raises(KdkitError, match="blocks 0..2"):
        requests(["query@3"], 3, "student")
    with pytest.raises(KdkitError, match="query@1"):
        parse("query@top")


def test_layer_outputs_group_passages_like_the_final_ones(encoder):
    q, p = encoder.tokenize(TEXTS[:2]), encoder.tokenize(TEXTS + TEXTS[::-1])  # 2 queries x 3 passages
    batch = {"query_input_ids": q["input_ids"], "query_attention_mask": q["attention_mask"],
             "passage_input_ids": p["input_ids"], "passage_attention_mask": p["attention_mask"]}
    with torch.no_grad():
        out = layer_outputs(encoder, batch, {"query": [0], "passage": [0, 1]})
        assert set(out.features) == {"query", "passage", "query@0", "passage@0", "passage@1"}
        assert out.features["passage@1"].shape == out.features["passage"].shape == (2, 3, 16)
        _, per_exit = encoder.forward_exits(p["input_ids"], p["attention_mask"], [1])
        torch.testing.assert_close(out.features["passage@1"].reshape(6, 16), per_exit[1])
        torch.testing.assert_close(out.features["query"], encoder(**q))
    assert list(by_layer(out, "passage")) == [0, 1]
