import math

import pytest
import torch

from kdkit.distillers.base import DistillContext
from kdkit.distillers.deit import DeiT, deit_loss
from kdkit.errors import KdkitError
from kdkit.features import FeatureTap
from kdkit.outputs import Outputs

from .helpers import distill_backward, from_yaml, staged_net
from .test_kd import kd_by_hand
from .vit_helpers import ViTPair as SharedPair
from .vit_helpers import tiny_vit

def vit_batch(n: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, 16, 16, generator=g), "label": torch.randint(0, 5, (n,), generator=g)}


def ViTPair(distiller, distilled: bool = True, seed: int = 0, num_classes: int = 5, **sizes):
    """The shared ViT pair with a one-block student (DeiT's distilled ViT by default) and a
    staged-CNN teacher of 5 classes (maps layer1-3, head fc)."""
    student = tiny_vit(seed, distilled=distilled, depth=1, num_classes=num_classes, **sizes)
    return SharedPair(distiller, student=student, teacher=staged_net(6))


def hard_by_loops(z_s, z_t, eps=0.0):
    """Mean over samples of -sum_c q_c log p_s(c), q = the teacher's argmax one-hot, smoothed."""
    total = 0.0
    for s_row, t_row in zip(z_s.tolist(), z_t.tolist()):
        k = len(s_row)
        y_t = max(range(k), key=lambda c: t_row[c])
        log_norm = math.log(sum(math.exp(v) for v in s_row))
        for c in range(k):
            q = (1 - eps) * (c == y_t) + eps / k
            total -= q * (s_row[c] - log_norm)
    return total / len(z_s)


def test_soft_and_hard_values_match_loops():
    torch.manual_seed(0)
    z_s, z_t = 3 * torch.randn(4, 5), 3 * torch.randn(4, 5)
    for tau in (1.0, 3.0):
        assert deit_loss(z_s, z_t, "soft", tau).item() == pytest.approx(kd_by_hand(z_s, z_t, tau), rel=1e-5)
    assert deit_loss(z_s, z_t, "hard").item() == pytest.approx(hard_by_loops(z_s, z_t), rel=1e-5)
    assert deit_loss(z_s, z_t, "hard", label_smoothing=0.1).item() == pytest.approx(
        hard_by_loops(z_s, z_t, 0.1), rel=1e-5)


def test_hard_value_by_hand():
    # teacher picks class 1 (logit 2 of [0, 2, 1]); student logits [0, 0, 0] -> CE = log 3
    z_s, z_t = torch.zeros(1, 3), torch.tensor([[0.0, 2.0, 1.0]])
    assert deit_loss(z_s, z_t, "hard").item() == pytest.approx(math.log(3), rel=1e-6)
    # a student already on y_t with a big margin: ~0
    assert deit_loss(torch.tensor([[0.0, 30.0, 0.0]]), z_t, "hard").item() == pytest.approx(0, abs=1e-6)


def test_reads_the_distillation_head_not_the_class_head():
    torch.manual_seed(1)
    cls, dist, teacher = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 5)
    d = DeiT(mode="soft", temperature=2.0)
    loss = d(Outputs(logits=cls, features={"head_dist": dist}), Outputs(logits=teacher), {})["loss"]
    assert loss.item() == pytest.approx(kd_by_hand(dist, teacher, 2.0), rel=1e-5)
    assert loss.item() != pytest.approx(kd_by_hand(cls, teacher, 2.0), rel=1e-3)


def test_gradients_reach_the_distillation_head_and_shared_blocks_not_the_class_head():
    d = DeiT(mode="hard")
    pair = ViTPair(d)
    batch = vit_batch()
    pair.build(d, batch)
    distill_backward(d, pair, batch)
    grads = {n: p.grad for n, p in pair.student.named_parameters()}
    assert grads["head.weight"] is None and grads["head.bias"] is None
    for name in ("head_dist.weight", "dist_token", "cls_token", "pos_embed", "patch_embed.proj.weight",
                 "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc2.weight", "norm.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert all(not p.requires_grad and p.grad is None for p in pair.teacher.parameters())
    assert list(d.parameters()) == [] and d.state_dict() == {}


def test_student_without_distillation_head_is_refused_by_the_tap():
    with pytest.raises(KdkitError, match="'head_dist' is not a module of VisionTransformer"):
        ViTPair(DeiT(), distilled=False)


def test_feature_that_is_not_distillation_logits():
    d = DeiT(student_feature="norm")
    tokens, logits = torch.zeros(2, 18, 16), torch.zeros(2, 5)
    with pytest.raises(KdkitError, match=r"'norm' has shape \(2, 18, 16\) and the teacher's logits \(2, 5\)"):
        d(Outputs(features={"norm": tokens}), Outputs(logits=logits), {})
    with pytest.raises(KdkitError, match=r"\(2, 7\).*\(2, 5\)"):
        DeiT().build(Outputs(features={"head_dist": torch.zeros(2, 7)}), Outputs(logits=logits), DistillContext())


def test_bad_settings():
    with pytest.raises(KdkitError, match="deit.mode must be one of"):
        DeiT(mode="medium")
    with pytest.raises(KdkitError, match="deit.temperature must be > 0"):
        DeiT(temperature=0)
    with pytest.raises(KdkitError, match=r"deit.label_smoothing must be in \[0, 1\)"):
        DeiT(label_smoothing=1.0)


def test_yaml_instantiates_and_runs():
    d = from_yaml("deit")
    assert (d.weight, d.mode, d.temperature, d.label_smoothing) == (0.5, "hard", 3.0, 0.0)
    assert d.student_feature == "head_dist"
    pair = ViTPair(d)
    batch = vit_batch()
    pair.build(d, batch)
    s, t = pair.student_outputs(batch), pair.teacher_outputs(batch)
    loss = d(s, t, batch)["loss"]
    assert loss.item() == pytest.approx(hard_by_loops(s.features["head_dist"].detach(), t.logits), rel=1e-5)


def test_build_tells_a_kdkit_distilled_vit_that_its_distillation_head_is_taught():
    from kdkit.models.vit import vit

    student = vit(5, img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, distillation_token=True)
    d = DeiT()
    tap = FeatureTap(student, d.student_features)
    s = Outputs(logits=student(torch.rand(2, 3, 16, 16)), features=tap.pop())
    assert not student.distilled_training  # the baseline's setting: labels train both heads
    d.build(s, Outputs(logits=torch.randn(2, 5)), DistillContext(models={"student": student}))
    assert student.distilled_training  # now training returns the class head alone
