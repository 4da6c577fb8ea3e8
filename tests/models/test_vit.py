"""Vision transformers (kdkit.models.vit): timm ViTs sized from config, DeiT's distilled ViT with
the paper's outputs, open_clip visual towers as classifiers, token layouts, and their configs."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from open_clip.transformer import VisionTransformer as ClipViT
from timm.models.vision_transformer import VisionTransformer

from kdkit.compose import compose
from kdkit.errors import KdkitError
from kdkit.features import FeatureTap
from kdkit.models.clip import clip_model
from kdkit.models.vit import DistilledViT, clip_visual_classifier, vit, vit_token_layout

TINY = dict(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0)
CLIP = "kdkit-vit-p8-d32"  # conf/clip_models: ViT 1 x 32, patch 8 on 32 x 32, 32-d embedding


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def vit_params(img, patch, dim, depth, mlp_ratio, classes, prefix=1, channels=3) -> int:
    """Parameters of a timm ViT counted by hand: patch embedding (conv + bias), prefix tokens,
    position embeddings (prefix + patches), per block two LayerNorms, qkv, proj, fc1, fc2, the
    final LayerNorm and one linear head per prefix token."""
    hidden, tokens = int(dim * mlp_ratio), (img // patch) ** 2
    block = 2 * 2 * dim + (dim * 3 * dim + 3 * dim) + (dim * dim + dim) + (dim * hidden + hidden) + (hidden * dim + dim)
    return (channels * patch * patch * dim + dim) + prefix * dim + (prefix + tokens) * dim \
        + depth * block + 2 * dim + prefix * (dim * classes + classes)


def test_vit_parameters_and_token_shapes_follow_the_config():
    model = vit(5, **TINY)
    assert type(model) is VisionTransformer
    assert model.patch_embed.proj.weight.shape == (16, 3, 4, 4)
    assert model.pos_embed.shape == (1, 1 + 16, 16) and model.cls_token.shape == (1, 1, 16)
    assert len(model.blocks) == 2 and model.blocks[0].attn.num_heads == 2
    assert model.blocks[0].attn.qkv.weight.shape == (48, 16)
    assert model.blocks[1].mlp.fc1.weight.shape == (32, 16)  # mlp_ratio 2
    assert model.head.weight.shape == (5, 16)
    assert count(model) == vit_params(16, 4, 16, 2, 2.0, 5) == 5637
    tap = FeatureTap(model, ["blocks.0", "blocks.1"])
    assert model(torch.rand(3, 3, 16, 16)).shape == (3, 5)
    feats = tap.pop()
    assert feats["blocks.0"].shape == feats["blocks.1"].shape == (3, 1 + 16, 16)
    assert vit_token_layout(model) == {"prefix_tokens": 1, "grid": (4, 4), "dim": 16}


def test_distillation_token_adds_a_prefix_token_and_head():
    model = vit(5, distillation_token=True, **TINY)
    assert isinstance(model, DistilledViT)
    assert model.dist_token.shape == (1, 1, 16) and model.pos_embed.shape == (1, 2 + 16, 16)
    assert model.head_dist.weight.shape == (5, 16)
    assert count(model) == vit_params(16, 4, 16, 2, 2.0, 5, prefix=2)
    tap = FeatureTap(model, ["blocks.0"])
    model(torch.rand(3, 3, 16, 16))
    assert tap.pop()["blocks.0"].shape == (3, 2 + 16, 16)
    assert vit_token_layout(model) == {"prefix_tokens": 2, "grid": (4, 4), "dim": 16}


def test_distilled_vit_without_a_distiller_trains_both_heads_on_the_labels():
    torch.manual_seed(0)
    model = vit(5, distillation_token=True, **TINY)
    tap = FeatureTap(model, ["head", "head_dist"])
    out = model.train()(torch.rand(4, 3, 16, 16))
    feats = tap.pop()
    torch.testing.assert_close(out, (feats["head"] + feats["head_dist"]) / 2, rtol=0, atol=0)
    F.cross_entropy(out, torch.tensor([0, 1, 2, 3])).backward()
    assert model.head.weight.grad.abs().sum() > 0 and model.head_dist.weight.grad.abs().sum() > 0


def test_distilled_vit_trains_the_class_head_and_averages_both_heads_in_eval():
    torch.manual_seed(0)
    model = vit(5, distillation_token=True, **TINY)
    model.train_distillation_head(True)  # what the deit distiller does when it is built
    tap = FeatureTap(model, ["norm", "head", "head_dist"])
    x = torch.rand(4, 3, 16, 16)

    out = model.train()(x)
    feats = tap.pop()
    assert set(feats) == {"norm", "head", "head_dist"}  # head_dist runs in training too
    assert torch.equal(out, feats["head"])
    assert torch.equal(out, model.head(feats["norm"][:, 0]))  # the class token's head
    torch.testing.assert_close(feats["head_dist"], model.head_dist(feats["norm"][:, 1]), rtol=0, atol=0)
    assert not torch.allclose(out, (feats["head"] + feats["head_dist"]) / 2)  # not the average
    F.cross_entropy(out, torch.tensor([0, 1, 2, 3])).backward()
    assert model.head.weight.grad.abs().sum() > 0
    assert model.head_dist.weight.grad is None  # cross-entropy alone never reaches head_dist

    with torch.no_grad():
        out = model.eval()(x)
    feats = tap.pop()
    assert set(feats) == {"norm", "head", "head_dist"}
    assert torch.equal(out, (feats["head"] + feats["head_dist"]) / 2)


def test_distilled_vit_exports_in_eval_mode(tmp_path):
    from kdkit.exports.program import export_program

    formats = ("pt2", "onnx") if all(importlib.util.find_spec(p) for p in ("onnx", "onnxscript")) else ("pt2",)
    model = vit(5, distillation_token=True, **TINY).train()  # inference_copy puts it in eval mode
    paths = export_program(model, torch.rand(2, 3, 16, 16), tmp_path, {}, formats=formats)
    # a format that failed to trace or to match the model's eval outputs would be missing here
    assert {p.name for p in paths} == {f"student.{f}" for f in formats} | {"inputs.json"}
    program = torch.export.load(str(tmp_path / "student.pt2")).module()
    x = torch.rand(3, 3, 16, 16)  # another batch size: the batch dimension is dynamic
    with torch.no_grad():
        torch.testing.assert_close(program(x), model.eval()(x), rtol=1e-5, atol=1e-5)


def test_vit_exports_as_a_timm_folder_that_timm_rebuilds(tmp_path):
    import timm

    from kdkit.exports.timm_dir import is_timm_model, save_timm_dir

    model = vit(5, **TINY).eval()
    assert is_timm_model(model)  # built through timm.create_model, which records the sizes
    save_timm_dir(model, tmp_path, (3, 16, 16), [0.5] * 3, [0.25] * 3)
    rebuilt = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_a_timm_name_gives_defaults_that_arguments_override():
    model = vit(3, name="vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1)
    assert model.embed_dim == 192 and model.blocks[0].attn.num_heads == 3  # vit_tiny's
    assert len(model.blocks) == 1 and model.blocks[0].mlp.fc1.out_features == 4 * 192
    assert vit_token_layout(model) == {"prefix_tokens": 1, "grid": (4, 4), "dim": 192}
    deit = vit(3, name="deit_tiny_distilled_patch16_224", img_size=16, patch_size=8, depth=1,
               distillation_token=True)
    assert isinstance(deit, DistilledViT) and deit.embed_dim == 192
    assert vit_token_layout(deit) == {"prefix_tokens": 2, "grid": (2, 2), "dim": 192}
    assert deit(torch.rand(2, 3, 16, 16)).shape == (2, 3)


def test_bad_names_and_sizes_explain_themselves():
    with pytest.raises(KdkitError, match=r"unknown timm ViT 'vit_tiny_patch16'.*vit_tiny_patch16_224"):
        vit(3, name="vit_tiny_patch16")
    with pytest.raises(KdkitError, match=r"unknown timm ViT 'resnet18'; close names: .*vit"):
        vit(3, name="resnet18")  # a timm model, but not a ViT
    with pytest.raises(KdkitError, match=r"no distillation token.*deit_tiny_distilled_patch16_224"):
        vit(3, name="vit_tiny_patch16_224", distillation_token=True)
    with pytest.raises(KdkitError, match=r"has a distillation token.*'deit_tiny_patch16_224'"):
        vit(3, name="deit_tiny_distilled_patch16_224")
    with pytest.raises(KdkitError, match=r"embed_dim=30 is not a multiple of num_heads=4.*\[1, 2, 3, 5, 6, 10, 15\]"):
        vit(3, embed_dim=30, num_heads=4)
    with pytest.raises(KdkitError, match=r"img_size=30 is not a multiple of patch_size=4"):
        vit(3, img_size=30)
    with pytest.raises(KdkitError, match=r"timm could not build .*embd_dim"):
        vit(3, embd_dim=16, **TINY)
    with pytest.raises(KdkitError, match="not a vision transformer"):
        vit_token_layout(torch.nn.Linear(2, 2))


def test_checkpoint_path_loads_local_weights(tmp_path):
    torch.manual_seed(0)
    trained = vit(5, distillation_token=True, **TINY)
    path = tmp_path / "last.ckpt"  # a kdkit Lightning checkpoint: keys under "student."
    torch.save({"state_dict": {f"student.{k}": v for k, v in trained.state_dict().items()}}, path)
    torch.manual_seed(1)
    loaded = vit(5, distillation_token=True, checkpoint_path=path, **TINY)
    for (name, a), b in zip(trained.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(KdkitError, match="checkpoint_path .* does not fit"):
        vit(5, checkpoint_path=path, **TINY)  # no dist_token / head_dist, a shorter pos_embed


def test_clip_visual_classifier_keeps_the_visual_tower_only():
    model = clip_visual_classifier(7, CLIP)
    assert [name for name, _ in model.named_children()] == ["visual", "head"]
    assert isinstance(model.visual, ClipViT)
    assert (model.head.in_features, model.head.out_features) == (32, 7)
    clip = clip_model(CLIP)
    assert count(model) == count(clip.visual) + 32 * 7 + 7 < count(clip)  # the text tower is gone
    assert not any(n.startswith(("transformer.", "token_embedding", "text")) for n, _ in model.named_parameters())
    tap = FeatureTap(model, ["visual.transformer.resblocks.0", "head:input"])
    images = torch.rand(3, 3, 32, 32)
    assert model(images).shape == (3, 7)
    feats = tap.pop()
    assert feats["visual.transformer.resblocks.0"].shape == (3, 1 + 16, 32)  # batch first, CLS first
    assert vit_token_layout(model) == {"prefix_tokens": 1, "grid": (4, 4), "dim": 32}
    assert vit_token_layout(clip) == vit_token_layout(model.visual) == vit_token_layout(model)
    with torch.no_grad():  # the head reads CLIP's (unnormalised) image embedding
        torch.testing.assert_close(feats["head:input"], model.visual(images))


def test_clip_visual_classifier_config_overrides_weights_and_freezing(tmp_path):
    model = clip_visual_classifier(4, "kdkit-vit-p8-d64", model_config={"vision_cfg": {"layers": 1}})
    assert len(model.visual.transformer.resblocks) == 1  # overridden
    assert model.visual.transformer.width == 64 and model.visual.patch_size == (8, 8)  # kept

    torch.manual_seed(0)
    clip = clip_model(CLIP)
    path = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), path)
    torch.manual_seed(1)
    model = clip_visual_classifier(4, CLIP, pretrained=str(path), freeze=True)
    for name, value in model.visual.state_dict().items():
        assert torch.equal(value, clip.visual.state_dict()[name]), name
    F.cross_entropy(model(torch.rand(2, 3, 32, 32)), torch.tensor([0, 3])).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.visual.parameters())
    assert model.head.weight.grad.abs().sum() > 0

    own = tmp_path / "classifier.pt"
    torch.save(model.state_dict(), own)
    torch.manual_seed(2)
    reloaded = clip_visual_classifier(4, CLIP, checkpoint_path=own)
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("group, name, params", [
    ("student", "vit_tiny", vit_params(32, 4, 128, 4, 2.0, 10)),
    ("student", "vit_tiny_distilled", vit_params(32, 4, 128, 4, 2.0, 10, prefix=2)),
    ("teacher", "vit_small", vit_params(32, 4, 192, 6, 2.0, 10)),
    ("student", "clip_visual", None),
])
def test_configs_build_models_for_cifar(group, name, params):
    cfg = compose(["data=cifar10", f"{group}={name}"])
    model = instantiate(cfg[group].model)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert cfg[group].normalize is None  # trained here on the data's own statistics
    if params is not None:
        assert count(model) == params
        assert isinstance(model, DistilledViT) == name.endswith("distilled")
        assert vit_token_layout(model)["grid"] == (8, 8)
        # head width 64 in teacher and students, so whole heads can be inherited
        assert model.embed_dim // model.blocks[0].attn.num_heads == 64
    else:
        assert count(model) == count(clip_model("kdkit-vit-p8-d64").visual) + 64 * 10 + 10


def test_vit_configs_bring_their_own_adamw_in_place_of_the_tasks_sgd():
    """A model's own optimizer with another ``_target_`` replaces task.optimizer (SGD) whole: no
    momentum / nesterov reach AdamW, and the CNN teacher keeps the task's SGD."""
    from kdkit.pipeline import make_task

    cfg = compose(["data=cifar10", "student=vit_tiny", "teacher=resnet20"])
    for role_cfg, model, expected in ((cfg.student, instantiate(cfg.student.model), torch.optim.AdamW),
                                      (cfg.teacher, instantiate(cfg.teacher.model), torch.optim.SGD)):
        task = make_task(cfg, student=model, role_of_student="student", student_cfg=role_cfg, probe=True)
        optimizer = task.optimizer_factory(task.param_groups())
        assert type(optimizer) is expected
        if expected is torch.optim.AdamW:
            assert optimizer.defaults["lr"] == 1e-3 and optimizer.defaults["weight_decay"] == 0.05
