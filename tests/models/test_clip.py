import json

import open_clip
import pytest
import torch

from kdkit.errors import KdkitError
from kdkit.models.clip import clip_model, clip_tokenizer, config_dir, preprocess_stats, register_configs

TINY = "kdkit-vit-p8-d32"


def test_shipped_configs_are_registered_with_open_clip():
    names = register_configs()
    assert {"kdkit-vit-p8-d32", "kdkit-vit-p8-d64", "kdkit-vit-p8-d128"} <= set(names)
    assert set(names) <= set(open_clip.list_models())
    assert config_dir().parent.name == "conf" and config_dir().name == "clip_models"
    spec = json.loads((config_dir() / f"{TINY}.json").read_text())
    model = clip_model(TINY)
    assert model.text_projection.shape == (spec["text_cfg"]["width"], spec["embed_dim"])
    assert model.visual.image_size == (32, 32) and model.context_length == 16


def test_local_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    original = clip_model(TINY)
    path = tmp_path / "student.pt"  # what kdkit exports: a bare state_dict
    torch.save(original.state_dict(), path)
    torch.manual_seed(1)
    loaded = clip_model(TINY, pretrained=str(path))
    for (name, a), b in zip(original.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    images, tokens = torch.rand(2, 3, 32, 32), clip_tokenizer(TINY)(["a photo of a cat.", "a dog"])
    with torch.no_grad():
        for a, b in zip(original(images, tokens), loaded(images, tokens)):
            torch.testing.assert_close(a, b)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(clip_model("kdkit-vit-p8-d64").state_dict(), path)
    with pytest.raises(KdkitError, match="could not load kdkit-vit-p8-d32 weights"):
        clip_model(TINY, pretrained=str(path))


def test_bad_name_and_missing_weights_explain_themselves(tmp_path):
    with pytest.raises(KdkitError, match="kdkit-vit-p8-d32"):
        clip_model("kdkit-vit-p8-d3")
    with pytest.raises(KdkitError, match="pretrained tags of ViT-B-32: .*openai"):
        clip_model("ViT-B-32", pretrained="no-such-tag")
    with pytest.raises(KdkitError, match="checkpoint file .* not found"):
        clip_model(TINY, pretrained=str(tmp_path / "missing.pt"))


def test_tokenizer_uses_the_config_context_length():
    tokens = clip_tokenizer(TINY)(["a photo of a cat."])
    assert tokens.shape == (1, 16) and tokens.dtype == torch.long
    sot, eot = 49406, 49407
    row = tokens[0].tolist()
    assert row[0] == sot and eot in row and all(t == 0 for t in row[row.index(eot) + 1:])
    assert clip_tokenizer(TINY, context_length=8)(["a photo of a cat."]).shape == (1, 8)


def test_preprocess_stats():
    stats = preprocess_stats(clip_model(TINY))
    assert stats["mean"] == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert stats["std"] == pytest.approx(open_clip.OPENAI_DATASET_STD)
    assert stats["size"] == (32, 32) and stats["context_length"] == 16
    assert preprocess_stats(clip_model(TINY, image_size=48))["size"] == (48, 48)
