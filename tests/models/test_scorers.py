"""Scorer teachers: a cross-encoder's scores are its model's logit; MaxSim equals a loop over tokens."""

import pytest
import torch

from kdkit.errors import KdkitError
from kdkit.models.scorers import CrossEncoder, MaxSimScorer, cross_encoder, is_scorer
from kdkit.models.text import hf_encoder
from kdkit.models.text_source import load_tokenizer, resolve_name_or_path
from kdkit.teacher import FrozenTeacher

QUERIES = ["stem cells heal hearts", "vitamin d and bones", "gene"]
PASSAGES = ["cardiac repair by stem cells in mice", "a study of bones", "gene therapy for lung cancer",
            "vitamin d trial"]


def tiny_config(**extra):
    return dict(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=32, max_position_embeddings=64, **extra)


@pytest.fixture(scope="module")
def cross_dir(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("cross")
    BertForSequenceClassification(BertConfig(**tiny_config(num_labels=1))).save_pretrained(folder)
    load_tokenizer(resolve_name_or_path(None)).save_pretrained(folder)
    return folder


def test_cross_encoder_scores_are_the_models_logit_on_the_joint_pair(cross_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    scorer = cross_encoder(str(cross_dir), max_length=12)
    model = AutoModelForSequenceClassification.from_pretrained(cross_dir).eval()
    tok = AutoTokenizer.from_pretrained(cross_dir)
    q, p = QUERIES[:2] + QUERIES[:1], PASSAGES[:3]
    with torch.no_grad():
        direct = [model(**tok(a, b, truncation=True, max_length=12, return_tensors="pt")).logits[0, 0].item()
                  for a, b in zip(q, p)]
    got = scorer.score(q, p, batch_size=2)  # padded batches give each pair its unpadded score
    assert got.shape == (3,) and torch.allclose(got, torch.tensor(direct), atol=1e-5)
    # pairs address distinct texts: (query 1, passage 0) etc.
    pairs = torch.tensor([[1, 0], [0, 2]])
    torch.testing.assert_close(scorer.score_pairs(QUERIES, PASSAGES, pairs),
                               scorer.score([QUERIES[1], QUERIES[0]], [PASSAGES[0], PASSAGES[2]]))
    assert is_scorer(scorer) and is_scorer(FrozenTeacher(scorer)) and not is_scorer(scorer.model)
    assert len(scorer.fingerprint()) == 40 and scorer.fingerprint() == scorer.fingerprint()


def test_cross_encoder_errors(cross_dir, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    with pytest.raises(KdkitError, match="name_or_path"):
        cross_encoder(None)
    with pytest.raises(KdkitError, match="not found"):
        cross_encoder(str(tmp_path / "missing"))
    two = BertForSequenceClassification(BertConfig(**tiny_config(num_labels=2)))
    with pytest.raises(KdkitError, match="num_labels=2"):
        CrossEncoder(two, load_tokenizer(str(cross_dir)))


def maxsim_by_loop(states_q, mask_q, states_p, mask_p):
    total = 0.0
    for i in range(len(mask_q)):
        if not mask_q[i]:
            continue
        e_q = states_q[i] / states_q[i].norm()
        total += max(float(e_q @ (states_p[j] / states_p[j].norm())) for j in range(len(mask_p)) if mask_p[j])
    return total


def test_maxsim_equals_a_loop_over_real_tokens():
    torch.manual_seed(0)
    encoder = hf_encoder(config=dict(model_type="bert", **tiny_config()), pretrained=False, max_length=16).eval()
    scorer = MaxSimScorer(encoder, query_max_length=6).eval()  # (train mode: dropout in the loop below)
    pairs = torch.tensor([[0, 0], [1, 1], [2, 2], [0, 3], [2, 0]])
    got = scorer.score_pairs(QUERIES, PASSAGES, pairs, batch_size=2)  # passages split across batches
    expected = []
    with torch.no_grad():
        for q, p in pairs.tolist():
            eq = encoder.tokenize([QUERIES[q]], max_length=6)  # each text alone: no padding
            ep = encoder.tokenize([PASSAGES[p]])
            hq = encoder.backbone(**eq).last_hidden_state[0]
            hp = encoder.backbone(**ep).last_hidden_state[0]
            expected.append(maxsim_by_loop(hq, eq["attention_mask"][0], hp, ep["attention_mask"][0]))
    assert torch.allclose(got, torch.tensor(expected), atol=1e-4)
    # at most one unit per query token: query 0 is cut to 6 tokens
    assert got[0] <= 6 + 1e-4
    assert scorer.score(QUERIES[:1], PASSAGES[:1])[0] == pytest.approx(got[0].item(), abs=1e-5)
    other = MaxSimScorer(encoder, query_max_length=8)
    assert other.fingerprint() != scorer.fingerprint()  # the length changes the scores: new cache key
    mean = MaxSimScorer(encoder, query_max_length=6, reduction="mean").eval()
    n_tokens = torch.tensor([len(encoder.tokenize([QUERIES[q]], max_length=6)["input_ids"][0]) for q, _ in pairs])
    torch.testing.assert_close(mean.score_pairs(QUERIES, PASSAGES, pairs), got / n_tokens)
    with pytest.raises(KdkitError, match="reduction"):
        MaxSimScorer(encoder, reduction="max")


def test_teacher_configs_build(cross_dir):
    """minilm_maxsim resolves the bundled all-MiniLM-L6-v2 (as conf/teacher/minilm.yaml does);
    cross_encoder needs name_or_path and builds a CrossEncoder from a folder."""
    from hydra.utils import instantiate

    from kdkit.compose import compose

    cfg = compose(["experiment=scifact_minilm_scorer"])
    maxsim = instantiate(cfg.teachers.maxsim.model)
    assert isinstance(maxsim, MaxSimScorer) and maxsim.reduction == "mean"  # the experiment's choice
    assert (maxsim.encoder.num_layers, maxsim.query_max_length, maxsim.passage_max_length) == (6, 256, 256)
    student = instantiate(cfg.student.model)  # sliced from the bi-encoder teacher
    assert maxsim.tokenizer.name_or_path == resolve_name_or_path(None) == student.tokenizer.name_or_path
    assert cfg.distiller.margin_mse.teacher == "maxsim" and cfg.distiller.embed.teacher == "bi"
    ce = compose(["experiment=scifact_minilm_scorer", "+teacher@teachers.ce=cross_encoder",
                  f"teachers.ce.model.name_or_path={cross_dir}", "teachers.ce.model.max_length=64"])
    scorer = instantiate(ce.teachers.ce.model)
    assert isinstance(scorer, CrossEncoder) and scorer.max_length == 64 and ce.teachers.ce.pretrained
