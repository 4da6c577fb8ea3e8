"""An open_clip model as an image classifier through its zero-shot head (kdkit.models.clip_zero_shot)."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from kdkit.checkpoints import load_weights
from kdkit.errors import KdkitError
from kdkit.models.clip import clip_model, clip_tokenizer, config_dir, preprocess_stats
from kdkit.models.clip_zero_shot import ZeroShotClassifier, zero_shot_classifier

TINY = "kdkit-vit-p8-d32"
NAMES = ["cat", "dog", "ship"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "a bad photo of a {}."]
TEACHER_CONF = config_dir().parent / "teacher"


def tiny_clip(seed: int):
    torch.manual_seed(seed)
    return clip_model(TINY)


def wrapper(seed: int = 0, names=NAMES, templates=TEMPLATES) -> ZeroShotClassifier:
    return zero_shot_classifier(tiny_clip(seed), names, templates, tokenizer=TINY).eval()


@torch.no_grad()
def expected_logits(clip, images, names=NAMES, templates=TEMPLATES):
    """CLIP zero-shot logits computed independently of the wrapper."""
    clip = clip.eval()
    tokenizer = clip_tokenizer(TINY)
    image = F.normalize(clip.encode_image(images), dim=-1)
    rows = []
    for name in names:
        text = clip.encode_text(tokenizer([t.format(name) for t in templates]))
        mean = F.normalize(text, dim=-1).mean(0)
        rows.append(mean / mean.norm())
    return clip.logit_scale.exp() * image @ torch.stack(rows).T


def test_logits_are_the_scaled_cosine_with_prompt_ensembles():
    model = wrapper()
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (4, len(NAMES))
    torch.testing.assert_close(logits, expected_logits(tiny_clip(0), images), atol=1e-5, rtol=1e-5)


def test_prompt_ensemble_mean_is_renormalised():
    model = wrapper()
    with torch.no_grad():
        classes = model.class_embeddings()
        tokens = clip_tokenizer(TINY)([t.format("cat") for t in TEMPLATES])
        plain_mean = F.normalize(model.clip.encode_text(tokens), dim=-1).mean(0)
    torch.testing.assert_close(classes.norm(dim=-1), torch.ones(len(NAMES)))
    assert plain_mean.norm() < 0.999  # distinct prompts: the bare mean is shorter than 1
    torch.testing.assert_close(classes[0], plain_mean / plain_mean.norm())


def test_class_embeddings_follow_loaded_weights(tmp_path):
    model, images = wrapper(seed=0), torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        before = model(images)  # caches the class embeddings of the seed-0 weights
    other = tiny_clip(1)
    path = tmp_path / "teacher.pt"
    torch.save(other.state_dict(), path)  # what a cifar10_clip run writes: a bare state_dict
    load_weights(model, path)
    with torch.no_grad():
        after = model(images)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected_logits(other, images), atol=1e-5, rtol=1e-5)


def test_in_place_edits_and_conversions_refresh_the_cache():
    model, images = wrapper(), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        cached = model.class_embeddings()
        assert model.class_embeddings() is cached  # unchanged weights: the cache is reused
        model.clip.text_projection.mul_(-1)  # an edit outside load_state_dict (version counter)
        flipped = model.class_embeddings()
        torch.testing.assert_close(flipped, -cached)
        model.double()  # new tensors (data_ptr, dtype)
        torch.testing.assert_close(model(images.double()).float(),
                                   expected_logits(model.clip, images.double()).float())
    model.train()
    assert model._cache is None  # dropped when the mode is set


def test_training_the_wrapper_reaches_both_towers():
    model = wrapper().train()
    model(torch.rand(2, 3, 32, 32)).logsumexp(-1).sum().backward()
    assert model.clip.visual.conv1.weight.grad.abs().sum() > 0
    assert model.clip.text_projection.grad.abs().sum() > 0
    assert model._cache is None  # a text tower that needs gradients is never cached


def test_bare_clip_state_dict_round_trips(tmp_path):
    model = wrapper(seed=2)
    clip_keys = list(tiny_clip(0).state_dict())
    assert list(model.state_dict()) == clip_keys  # the wrapper's keys are the CLIP model's
    path = tmp_path / "teacher.pt"
    torch.save(model.state_dict(), path)
    reloaded = clip_model(TINY, pretrained=str(path))  # and its files load into clip_model
    for key, value in model.clip.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key
    prefixed = {f"clip.{k}": v for k, v in tiny_clip(3).state_dict().items()}
    assert not any(model.load_state_dict(prefixed, strict=True))  # named_parameters names too
    holder = torch.nn.ModuleDict({"model": wrapper(seed=4)})  # nested, as in a Lightning module
    state = holder.state_dict()
    assert all(k.startswith("model.") and not k.startswith("model.clip.") for k in state)
    target = torch.nn.ModuleDict({"model": wrapper(seed=5)})
    target.load_state_dict(state, strict=True)
    for key, value in state.items():
        assert torch.equal(target.state_dict()[key], value), key
    bad = {k: v for k, v in tiny_clip(0).state_dict().items() if k != "logit_scale"}
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(KdkitError, match="1 missing keys"):
        load_weights(model, tmp_path / "bad.pt")


def test_frozen_wrapper_has_no_trainable_parameters_and_still_predicts():
    from kdkit.teacher import FrozenTeacher

    model = wrapper()
    model.requires_grad_(False)
    assert not any(p.requires_grad for p in model.parameters())
    teacher = FrozenTeacher(model)
    images = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():  # the first call from Lightning's test loop
        logits = teacher(images)
    assert logits.shape == (2, len(NAMES)) and not logits.requires_grad
    again = model(images)  # grad enabled: the cached embeddings are ordinary tensors
    torch.testing.assert_close(again, logits.clone())
    assert not again.requires_grad


def test_class_count_is_the_number_of_names_and_a_mismatch_is_caught():
    from kdkit.outputs import Outputs
    from kdkit.tasks.classification import ClassificationTask

    logits = wrapper()(torch.rand(2, 3, 32, 32))
    assert logits.shape[-1] == len(NAMES)
    task = SimpleNamespace(num_classes=10)
    with pytest.raises(KdkitError, match="predicts 3 classes but the data has 10"):
        ClassificationTask.check_outputs(task, Outputs(logits=logits), "teacher")


def test_auto_embedding_is_the_image_embedding():
    from kdkit.features import last_linear

    model = wrapper()
    assert last_linear(model) == "head"  # not a layer of the text tower
    seen = {}
    model.head.register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32))
    assert seen["x"].shape == (2, model.clip.visual.output_dim)


def test_input_pipeline_attributes_come_from_the_clip_preprocessing():
    model = wrapper()
    stats = preprocess_stats(model.clip)
    assert model.image_size == (32, 32) == stats["size"]
    assert model.mean == stats["mean"] and model.std == stats["std"]
    assert model.input_options == {"normalize": {"mean": list(stats["mean"]), "std": list(stats["std"])},
                                   "image_size": [32, 32]}


def test_bad_arguments_explain_themselves():
    clip = tiny_clip(0)
    with pytest.raises(KdkitError, match="exactly one"):
        zero_shot_classifier(clip, NAMES, ["no placeholder"], tokenizer=TINY)
    with pytest.raises(KdkitError, match="non-empty list"):
        zero_shot_classifier(clip, [], tokenizer=TINY)
    with pytest.raises(KdkitError, match="give the tokenizer"):
        zero_shot_classifier(clip, NAMES)


def _conf(name: str):
    return OmegaConf.load(TEACHER_CONF / f"{name}.yaml")


def test_cifar10_teacher_config_builds_a_ten_class_teacher():
    from hydra.utils import instantiate

    from kdkit.compose import compose
    from kdkit.datamodules.cifar10 import CIFAR10DataModule, CLASSES
    from kdkit.datamodules.cifar10_pairs import CIFAR_TEMPLATES

    node = _conf("cifar10_clip_zero_shot")
    assert set(_conf("resnet56")) <= set(node)
    cfg = compose(["teacher=cifar10_clip_zero_shot", "data=cifar10"])  # as kdkit-train composes it
    assert cfg.data.num_classes == len(CLASSES)
    model = instantiate(cfg.teacher.model).eval()
    assert model.class_names == CLASSES == tuple(CIFAR10DataModule.class_names.fget(None))
    assert model.templates == CIFAR_TEMPLATES  # the captions the cifar10_clip teacher learns from
    assert list(cfg.teacher.normalize.mean) == list(model.mean)
    assert list(cfg.teacher.normalize.std) == list(model.std)
    assert cfg.teacher.image_size is None and model.image_size == (32, 32)
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_vit_b32_teacher_config_matches_the_model_preprocessing():
    node = _conf("clip_vit_b32_zero_shot")
    assert set(_conf("resnet56")) <= set(node)
    assert node.pretrained is True and node.image_size == 224
    assert node.model.clip.name == "ViT-B-32" and node.model.clip.pretrained == "openai"
    import open_clip

    assert list(node.normalize.mean) == list(open_clip.OPENAI_DATASET_MEAN)
    assert list(node.normalize.std) == list(open_clip.OPENAI_DATASET_STD)
    cfg = open_clip.get_model_config("ViT-B-32")
    assert cfg["vision_cfg"]["image_size"] == 224
